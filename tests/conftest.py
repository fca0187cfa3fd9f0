"""Shared fixtures: one local Ray instance per test session, and the sample data's paths."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "datasets" / "sample"
SAMPLE_MANIFEST = SAMPLE / "manifest.csv"


@pytest.fixture(scope="session")
def ray_session():
    """A 2-CPU local Ray cluster shared by every test that runs a pipeline."""
    import ray

    os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def sample_manifest() -> Path:
    return SAMPLE_MANIFEST
