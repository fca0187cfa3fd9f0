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


# -- prototype library (issue 4) -----------------------------------------------------------------
REAL_INVERT = REPO / "data" / "invert"
REAL_CLIPS = REPO / "data" / "curate" / "clips.parquet"


@pytest.fixture(scope="session")
def synthetic_upstream(tmp_path_factory) -> dict[str, Path]:
    """Synthetic clips/controls/events/frames tables with the upstream schemas (no Ray, ~1 s)."""
    from prototype_store.synthetic import write_synthetic_upstream

    return write_synthetic_upstream(tmp_path_factory.mktemp("upstream"), n_clips=12, n_frames=150, seed=0)


@pytest.fixture(scope="session")
def library_upstream(synthetic_upstream) -> dict[str, Path]:
    """invert's real outputs on the sample clips when `dvc repro invert` has produced them,
    otherwise the synthetic tables; the store tests run on whichever this gives."""
    if (REAL_INVERT / "controls.parquet").exists() and (REAL_INVERT / "events.parquet").exists():
        return {"controls": REAL_INVERT, "clips": REAL_CLIPS, "real": True}
    return {**synthetic_upstream, "real": False}


@pytest.fixture(scope="session")
def sample_library(library_upstream, tmp_path_factory) -> Path:
    """A built library (Parquet + exact index) from ``library_upstream``; tests must not modify it."""
    from cogportrait.config import IndexConfig, PrototypesConfig
    from prototype_store import build_index
    from prototype_store.build import build_prototypes_local

    out = tmp_path_factory.mktemp("library")
    build_prototypes_local(
        PrototypesConfig(controls=str(library_upstream["controls"]), clips=str(library_upstream["clips"]), out=str(out))
    )
    build_index(out, IndexConfig(exact_scan_max=0))
    return out


@pytest.fixture(scope="session")
def curated_sample(tmp_path_factory, ray_session) -> Path:
    """The curate job's output on the bundled sample dataset (run once per session).

    Downstream tests (extract, invert, prototypes) build on ``<dir>/clips.parquet``.
    """
    from cogportrait.config import CurateConfig
    from pipelines.curate import run

    out = tmp_path_factory.mktemp("curated_sample")
    run(CurateConfig(manifest=str(SAMPLE_MANIFEST), out=str(out), num_workers=2))
    return out
