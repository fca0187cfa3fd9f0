"""curate's journal: each finished video's table rows, so an interrupted job resumes.

A 10 000-video job stopped part-way (a killed worker, a pre-empted node, Ctrl-C) must not start
over. When every row of a video has reached the driver (the scan step says how many it makes),
the driver writes the video's clips and rejects rows under ``<out>/journal/``; a rerun skips
the videos whose entry matches and whose clip files are there, and merges the entries into the
final tables, which are byte-identical to a run from scratch's.

An entry matches only its own video file (path, size, modification time) under the same
settings: the key hashes every output-changing field of ``CurateConfig`` and the source of the
code that makes the rows, so a change to a threshold or to the code re-runs the videos (as
``dvc repro`` would re-run the stage). Entries are plain Parquet and JSON written atomically,
the JSON last: an entry without it is ignored.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from cogportrait.config import CurateConfig
from cogportrait.io.atomic import write_json, write_table
from cogportrait.schema import CLIPS_SCHEMA, REJECTS_SCHEMA

log = logging.getLogger("cogportrait.curate.journal")

# settings that say how a job runs, not what it writes
RUN_ONLY_FIELDS = ("manifest", "out", "num_workers")
_PACKAGE = Path(__file__).resolve().parents[1]
# the code whose change changes a video's rows
CODE_FILES = (*sorted((_PACKAGE / "curate").glob("*.py")), _PACKAGE / "io" / "video.py", _PACKAGE / "io" / "audio.py",
              _PACKAGE / "schema.py")


def settings_key(cfg: CurateConfig) -> str:
    """Hash of the output-changing settings and of the code that applies them."""
    h = hashlib.sha256()
    fields = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in RUN_ONLY_FIELDS}
    h.update(json.dumps(fields, sort_keys=True, default=str).encode())
    for path in CODE_FILES:
        h.update(path.name.encode())
        h.update(path.read_bytes())
    return h.hexdigest()[:16]


def video_entry_name(video_id: str) -> str:
    """A file-name-safe, fixed-length name for any video id."""
    return hashlib.sha1(video_id.encode()).hexdigest()[:20]


def file_stamp(path: str | Path) -> dict:
    """What identifies the bytes of a video file without reading them (absent file: empty)."""
    p = Path(path)
    if not p.is_file():
        return {}
    st = p.stat()
    return {"path": str(p.resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


@dataclass
class Entry:
    """One finished video: its rows and what the job's metrics sum over videos."""

    video_id: str
    clips: pa.Table
    rejects: pa.Table
    summary: dict  # duration_s, n_src_frames (no timings: an entry's bytes depend on its inputs only)


class Journal:
    def __init__(self, folder: str | Path, cfg: CurateConfig) -> None:
        self.folder = Path(folder)
        self.key = settings_key(cfg)

    def _paths(self, video_id: str) -> tuple[Path, Path, Path]:
        stem = self.folder / video_entry_name(video_id)
        return stem.with_suffix(".clips.parquet"), stem.with_suffix(".rejects.parquet"), stem.with_suffix(".json")

    def record(self, video_id: str, path: str, clips: list[dict], rejects: list[dict], summary: dict) -> None:
        """Write a finished video's entry (the JSON last: it marks the entry complete)."""
        clips_path, rejects_path, meta_path = self._paths(video_id)
        write_table(clips_path, clips, CLIPS_SCHEMA)
        write_table(rejects_path, rejects, REJECTS_SCHEMA)
        write_json(meta_path, {"key": self.key, "video_id": video_id, "file": file_stamp(path), "summary": summary})

    def load(self, video_id: str, path: str, clips_root: Path) -> Entry | None:
        """The video's entry if it matches these settings and this file, and its clips exist."""
        clips_path, rejects_path, meta_path = self._paths(video_id)
        if not meta_path.is_file():
            return None
        meta = json.loads(meta_path.read_text())
        if meta.get("key") != self.key or meta.get("video_id") != video_id or meta.get("file") != file_stamp(path):
            return None
        clips = pq.read_table(clips_path, schema=CLIPS_SCHEMA)
        for rel in (*clips.column("clip_path").to_pylist(), *filter(None, clips.column("audio_path").to_pylist())):
            if not (clips_root / rel).is_file():
                log.info("journal: %s lacks %s; the video runs again", video_id, rel)
                return None
        return Entry(video_id, clips, pq.read_table(rejects_path, schema=REJECTS_SCHEMA), meta["summary"])

    def prune(self, keep_video_ids: set[str]) -> int:
        """Remove the entries of videos no longer in the manifest; returns how many files went."""
        if not self.folder.is_dir():
            return 0
        names = {video_entry_name(v) for v in keep_video_ids}
        removed = 0
        for path in self.folder.iterdir():
            if path.name.split(".")[0] not in names:
                path.unlink()
                removed += 1
        return removed
