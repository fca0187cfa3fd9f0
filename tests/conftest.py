"""Shared fixtures: one local Ray instance per test session, and the sample data's paths."""

from __future__ import annotations

import fcntl
import os
import shutil
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.append(str(REPO))  # bench/ is not an installed package: tests import bench.synthetic
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


def built_once(tmp_path_factory, name: str, build: Callable[[Path], None]) -> Path:
    """A read-only session output (the sample's curate -> extract -> invert -> library chain) built
    once per test run. Under pytest-xdist each test process is a session of its own, and both would
    build the same chain at the same time on the same two cores; here the first to ask builds it
    under an exclusive lock in the run's shared temp folder, and the others wait for it, then read it."""
    if os.environ.get("PYTEST_XDIST_WORKER") is None:  # one process: nothing to share
        out = tmp_path_factory.mktemp(name)
        build(out)
        return out
    root = tmp_path_factory.getbasetemp().parent  # the run's folder, above each process's own
    out, done = root / name, root / f"{name}.built"
    with open(root / f"{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        if not done.is_file():
            shutil.rmtree(out, ignore_errors=True)  # a build that failed part-way
            out.mkdir()
            build(out)
            done.touch()
    return out


# -- prototype library (issue 4) -----------------------------------------------------------------
# fingerprint cache of prototype_store: keep the tests' entries out of the user's home
os.environ.setdefault("COGPORTRAIT_CACHE_DIR", str(Path(__import__("tempfile").mkdtemp(prefix="cogportrait-cache-"))))


@pytest.fixture(scope="session")
def synthetic_upstream(tmp_path_factory) -> dict[str, Path]:
    """Synthetic clips/controls/events/frames tables with the upstream schemas (no Ray, ~1 s)."""
    from bench.synthetic import write_synthetic_upstream

    return write_synthetic_upstream(tmp_path_factory.mktemp("upstream"), n_clips=12, n_frames=150, seed=0)


@pytest.fixture(scope="session")
def library_upstream(request) -> dict[str, Path]:
    """invert's real outputs on the sample clips (curate -> extract -> invert, once per session)."""
    curated = request.getfixturevalue("curated_sample")
    extracted = request.getfixturevalue("extracted_sample")
    inverted = request.getfixturevalue("inverted_sample")
    return {"controls": inverted, "frames": extracted / "frames.parquet", "clips": curated / "clips.parquet"}


@pytest.fixture(scope="session")
def sample_library(library_upstream, tmp_path_factory) -> Path:
    """The real sample library (Parquet + exact index) built from ``library_upstream``; read-only."""
    from cogportrait.config import IndexConfig, PrototypesConfig
    from prototype_store import build_index
    from prototype_store.build import build_prototypes_local

    def build(out: Path) -> None:
        build_prototypes_local(
            PrototypesConfig(
                controls=str(library_upstream["controls"]), frames=str(library_upstream["frames"]),
                clips=str(library_upstream["clips"]), out=str(out),
            )
        )
        build_index(out, IndexConfig())

    return built_once(tmp_path_factory, "library", build)


@pytest.fixture(scope="session")
def curated_sample(tmp_path_factory, ray_session) -> Path:
    """The curate job's output on the bundled sample dataset (run once per session).

    Downstream tests (extract, invert, prototypes) build on ``<dir>/clips.parquet``.
    """
    from cogportrait.config import CurateConfig
    from pipelines.curate import run

    return built_once(tmp_path_factory, "curated_sample",
                      lambda out: run(CurateConfig(manifest=str(SAMPLE_MANIFEST), out=str(out), num_workers=2)))


# -- extract / invert (issue 3) ----------------------------------------------------------------
@pytest.fixture(scope="session")
def extracted_sample(curated_sample, tmp_path_factory) -> Path:
    """The extract job's output on the curated sample clips (run once per session)."""
    from cogportrait.config import ExtractConfig
    from pipelines.extract import run

    return built_once(tmp_path_factory, "extracted_sample",
                      lambda out: run(ExtractConfig(clips=str(curated_sample / "clips.parquet"), out=str(out), num_workers=2)))


@pytest.fixture(scope="session")
def inverted_sample(extracted_sample, tmp_path_factory) -> Path:
    """The invert job's output (controls, events, face model, metrics) on the sample clips."""
    from cogportrait.config import InvertConfig
    from pipelines.invert import run

    return built_once(tmp_path_factory, "inverted_sample",
                      lambda out: run(InvertConfig(frames=str(extracted_sample), out=str(out), num_workers=2)))


def clip_ids_by_video(clips_parquet: Path) -> dict[str, list[str]]:
    """video_id -> clip ids (in start order) of a clips table."""
    import pyarrow.parquet as pq

    out: dict[str, list[str]] = {}
    rows = sorted(pq.read_table(clips_parquet, columns=["clip_id", "video_id", "start_s"]).to_pylist(), key=lambda r: r["start_s"])
    for r in rows:
        out.setdefault(r["video_id"], []).append(r["clip_id"])
    return out


@pytest.fixture(scope="session")
def edge_clips(curated_sample, tmp_path_factory) -> dict[str, Path]:
    """Hand-made clips for edge cases, built from real curated clips.

    face_loss: lp_d0 with frames 30-44 blacked out; one_frame: lp_d0's first frame;
    zero_frame: an mp4 with a video stream and no frame; missing: a path with no file;
    mirrored: lp_d3 frames 0-59 flipped left-right, flagged mirrored.
    """
    import av
    import numpy as np
    import pyarrow as pa
    from fractions import Fraction

    from cogportrait.io.atomic import write_table
    from cogportrait.io.video import VideoWriter, iter_frames, probe_video
    from cogportrait.schema import CLIPS_SCHEMA

    folder = tmp_path_factory.mktemp("edge_clips")
    ids = clip_ids_by_video(curated_sample / "clips.parquet")
    d0 = curated_sample / "clips" / f"{ids['lp_d0'][0]}.mp4"
    d3 = curated_sample / "clips" / f"{ids['lp_d3'][0]}.mp4"

    def rewrite(src: Path, dst: Path, fn, stop: int | None = None) -> Path:
        info = probe_video(src)
        with VideoWriter(dst, fps=25, size=info.width, preset="ultrafast", crf=16) as w:
            for i, rgb in iter_frames(src, info, end_frame=stop):
                out = fn(i, rgb)
                if out is not None:
                    w.write(out)
        return dst

    paths = {
        "face_loss": rewrite(d0, folder / "face_loss.mp4", lambda i, x: np.zeros_like(x) if 30 <= i < 45 else x),
        "one_frame": rewrite(d0, folder / "one_frame.mp4", lambda i, x: x, stop=1),
        "mirrored": rewrite(d3, folder / "mirrored.mp4", lambda i, x: np.ascontiguousarray(x[:, ::-1]), stop=60),
        "missing": folder / "missing.mp4",
        "zero_frame": folder / "zero_frame.mp4",
    }
    with av.open(str(paths["zero_frame"]), "w") as c:
        s = c.add_stream("libx264", rate=Fraction(25))
        s.width = s.height = 64
        s.pix_fmt = "yuv420p"
        c.start_encoding()
    rows = [
        {"clip_id": f"edge-{name}", "video_id": f"edge-{name}", "clip_path": p.name, "identity": f"edge-{name}",
         "mirrored": name == "mirrored", "label": "edge case"}
        for name, p in paths.items()
    ]
    write_table(folder / "clips.parquet", pa.Table.from_pylist(rows, schema=CLIPS_SCHEMA), CLIPS_SCHEMA)
    return {"dir": folder, **paths}


@pytest.fixture(scope="session")
def edge_extracted(edge_clips, ray_session, tmp_path_factory) -> Path:
    from cogportrait.config import ExtractConfig
    from pipelines.extract import run

    out = tmp_path_factory.mktemp("edge_extracted")
    run(ExtractConfig(clips=str(edge_clips["dir"] / "clips.parquet"), out=str(out), num_workers=2))
    return out


# -- Stage 1 outputs (issue 8), shared by the compile and sample tests -------------------------
@pytest.fixture(scope="session")
def compile_cfg(sample_library, inverted_sample):
    from cogportrait.config import CompileConfig

    return CompileConfig(library=str(sample_library), face_model=str(inverted_sample / "face_model"),
                         categories=str(REPO / "datasets/emh/categories.yaml"),
                         instructions=str(REPO / "datasets/emh/instructions.yaml"))


@pytest.fixture(scope="session")
def params_file(compile_cfg, tmp_path_factory) -> Path:
    """params.yaml pointing `compile` at the session's sample library and face model."""
    import yaml

    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["compile"].update(library=compile_cfg.library, face_model=compile_cfg.face_model,
                             categories=compile_cfg.categories, instructions=compile_cfg.instructions)
    path = tmp_path_factory.mktemp("params") / "params.yaml"
    path.write_text(yaml.safe_dump(params))
    return path
