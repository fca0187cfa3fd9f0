"""What every DVC stage promises, on the real sample: the same bytes on a rerun, one identity key
across stages, and a Ctrl-C that stops the job within seconds and leaves no partial table."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from cogportrait.config import IndexConfig, InvertConfig, KtoConfig, PrototypesConfig
from cogportrait.face.model import load_baselines
from cogportrait.schema import identity_key

from conftest import REPO, SAMPLE_MANIFEST

pytestmark = pytest.mark.slow


def digests(folder: Path) -> dict[str, str]:
    """sha256 of every file a stage wrote (metrics JSON holds timings and is left out)."""
    return {
        p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and "metrics" not in p.name
    }


def test_invert_rerun_writes_the_same_bytes(extracted_sample, inverted_sample, tmp_path, ray_session):
    from pipelines.invert import run

    run(InvertConfig(frames=str(extracted_sample), out=str(tmp_path), num_workers=2))
    first, again = digests(inverted_sample), digests(tmp_path)
    assert {"controls.parquet", "events.parquet", "rejects.parquet", "face_model/model.json"} <= set(first)
    assert again == first


def test_library_and_kto_reruns_write_the_same_bytes(library_upstream, tmp_path, ray_session):
    from pipelines.kto import run as run_kto
    from pipelines.prototypes import run as run_prototypes
    from prototype_store import build_index

    upstream = {k: str(v) for k, v in library_upstream.items()}
    for attempt in ("a", "b"):
        run_prototypes(PrototypesConfig(**upstream, out=str(tmp_path / attempt / "library")))
        build_index(tmp_path / attempt / "library", IndexConfig())
        run_kto(KtoConfig(**upstream, out=str(tmp_path / attempt / "kto")))
    a, b = digests(tmp_path / "a"), digests(tmp_path / "b")
    assert {"library/prototypes.parquet", "kto/kto.parquet"} <= set(a) and any(k.startswith("library/index/") for k in a)
    assert a == b


def test_one_identity_key_in_invert_prototypes_and_kto(library_upstream, sample_library, tmp_path, ray_session):
    """Clips of the sample's unlabelled multi-shot video (no identity) carry the same key in the
    face model's baselines, the prototypes and the KTO rows."""
    from pipelines.kto import run

    clips = pq.read_table(library_upstream["clips"], columns=["clip_id", "identity"]).to_pylist()
    unlabelled = {c["clip_id"]: identity_key(c["identity"], c["clip_id"]) for c in clips if c["identity"] in (None, "", "unknown")}
    assert unlabelled, "the sample has clips without an identity (multishot5)"
    baselines = load_baselines(Path(library_upstream["controls"]) / "face_model" / "baselines.npz")
    protos = pq.read_table(sample_library / "prototypes.parquet", columns=["clip_id", "identity"]).to_pylist()
    # any head movement counts as "large", so every clip long enough yields KTO windows
    run(KtoConfig(**{k: str(v) for k, v in library_upstream.items()}, out=str(tmp_path),
                  head_yaw_deg=0.01, head_pitch_deg=0.01, head_roll_deg=0.01))
    kto = pq.read_table(tmp_path / "kto.parquet", columns=["clip_id", "identity"]).to_pylist()
    for name, rows in (("prototypes", protos), ("kto", kto)):
        seen = {r["clip_id"]: r["identity"] for r in rows if r["clip_id"] in unlabelled}
        assert seen, f"no {name} row for an unlabelled clip"
        assert seen == {c: unlabelled[c] for c in seen}, name
    assert set(unlabelled.values()) <= set(baselines)


def test_ctrl_c_stops_curate_within_seconds_and_leaves_no_table(tmp_path):
    """SIGINT to the whole process group, as a terminal sends it, while curate is working."""
    out = tmp_path / "out"
    env = {**os.environ, "RAY_DATA_DISABLE_PROGRESS_BARS": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "pipelines.cli", "curate", "--manifest", str(SAMPLE_MANIFEST), "--out", str(out)],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True,
    )
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:  # interrupt once clips are being written
        if (out / "clips").is_dir() and any((out / "clips").iterdir()):
            break
        time.sleep(0.2)
    assert proc.poll() is None, "curate ended before it could be interrupted"
    os.killpg(proc.pid, signal.SIGINT)
    t0 = time.monotonic()
    try:
        _, stderr = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    stopped_s = time.monotonic() - t0
    assert proc.returncode == 130, stderr.decode()[-2000:]
    assert stopped_s < 15, stopped_s
    assert not list(out.glob("*.parquet")) and not (out / "metrics.json").exists()
    assert not [p for p in out.rglob(".*")], "temporaries left behind"
