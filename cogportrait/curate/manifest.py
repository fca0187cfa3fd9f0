"""Manifest validation: which rows can be processed, and a reject for each row that cannot."""

from __future__ import annotations

import csv
import os
from dataclasses import dataclass
from pathlib import Path

from cogportrait.config import FALSE_WORDS, TRUE_WORDS
from cogportrait.schema import MANIFEST_OPTIONAL_COLUMNS, MANIFEST_REQUIRED_COLUMNS


class ManifestError(ValueError):
    """The manifest as a whole cannot be used (missing file or columns)."""


@dataclass(frozen=True)
class ManifestReject:
    manifest_row: int
    video_id: str
    path: str
    reason: str
    detail: str


def read_manifest(manifest: str | os.PathLike) -> tuple[list[dict], list[ManifestReject], Path]:
    """Return (valid rows, rejected rows, dataset root).

    The dataset root is the manifest's folder; paths resolve against it and must stay inside it
    (symlinks included). The first row with an id wins; later duplicates are rejected.
    """
    manifest = Path(manifest)
    if not manifest.is_file():
        raise ManifestError(f"manifest {manifest} not found")
    root = manifest.resolve().parent
    with open(manifest, newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        columns = [c.strip() for c in (reader.fieldnames or [])]
        missing = [c for c in MANIFEST_REQUIRED_COLUMNS if c not in columns]
        if missing:
            raise ManifestError(
                f"manifest {manifest} lacks column(s) {missing}; required: {list(MANIFEST_REQUIRED_COLUMNS)}, "
                f"optional: {list(MANIFEST_OPTIONAL_COLUMNS)}"
            )
        raw_rows = [{(k or "").strip(): (v or "").strip() for k, v in row.items()} for row in reader]

    valid: list[dict] = []
    rejects: list[ManifestReject] = []
    seen: dict[str, int] = {}
    for i, raw in enumerate(raw_rows):
        video_id, rel = raw.get("video_id", ""), raw.get("path", "")

        def reject(reason: str, detail: str) -> None:
            rejects.append(ManifestReject(i, video_id, rel, reason, detail))

        if not video_id or not rel:
            reject("invalid_row", "empty video_id or path")
            continue
        if video_id in seen:
            reject("duplicate_id", f"video_id {video_id!r} already on manifest row {seen[video_id]}")
            continue
        seen[video_id] = i
        mirrored_word = (raw.get("mirrored") or "").strip().lower() or "false"  # an empty cell: not mirrored
        if mirrored_word not in TRUE_WORDS | FALSE_WORDS:
            reject("invalid_row", f"mirrored={raw.get('mirrored')!r} is not true/false")
            continue
        resolved = (root / rel).resolve()
        if not resolved.is_relative_to(root):
            reject("path_outside_root", f"{rel!r} resolves to {resolved}, outside {root}")
            continue
        valid.append(
            {
                "video_id": video_id,
                "path": str(resolved),
                "source": raw.get("source", ""),
                "license": raw.get("license", ""),
                "label": raw.get("label", ""),
                "identity": raw.get("identity") or str(MANIFEST_OPTIONAL_COLUMNS["identity"]),
                "mirrored": mirrored_word in TRUE_WORDS,
                "manifest_row": i,
            }
        )
    return valid, rejects, root
