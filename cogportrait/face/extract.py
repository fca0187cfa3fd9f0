"""Per-clip face extraction: decode one clip in order, landmark every frame, build frames rows.

The clip is the unit of work because VIDEO-mode tracking needs its frames in order. Frames where
the face is lost are kept with ``face_present = False`` and null signals: row counts always
equal the clip's frame count. ``face_score`` is 1 where the landmarker accepted a face (it passed
``min_presence_confidence``; the Tasks API exposes no per-frame score) and 0 where it did not.
For a mirrored source, keypoints, AU/gaze proxies and head pose follow the subject's own left
(groups and L/R blendshapes swapped, yaw and roll negated: DESIGN.md); landmarks, blendshapes and
transform stay as MediaPipe reported them, and invert un-mirrors those itself.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa

from cogportrait.config import ExtractConfig
from cogportrait.face.au_backends import AUBackend
from cogportrait.face.landmarker import VideoLandmarker
from cogportrait.face.pose import head_pose_from_rotation, mirror_keypoint_groups, rotation_from_transform
from cogportrait.face.proxies import mirror_blendshapes
from cogportrait.io.video import VideoError
from cogportrait.schema import CLIP_FPS, FRAMES_SCHEMA, KEYPOINT_INDICES, N_KEYPOINTS

log = logging.getLogger("cogportrait.face.extract")


def iter_clip_frames(path: str | Path, fps: int = CLIP_FPS) -> Iterator[tuple[int, np.ndarray]]:
    """(frame at ``fps``, RGB) in order, decoding sequentially with decord ``next()``.

    Clips from curate are already 25 fps; other rates are resampled by nearest timestamp so
    that frame numbers are always 25 fps clip frames.
    """
    import decord
    from decord._ffi.base import DECORDError

    path = Path(path)
    if not path.is_file():
        raise VideoError("missing_file", f"no file at {path}")
    if path.stat().st_size == 0:
        raise VideoError("empty_file", f"{path} has zero bytes")
    try:
        reader = decord.VideoReader(str(path), num_threads=1)
    except (RuntimeError, DECORDError) as err:  # missing stream, broken container
        raise VideoError("undecodable", f"{path.name}: {str(err).splitlines()[0][:200]}") from err
    n_src = len(reader)
    if n_src == 0:
        raise VideoError("no_frames", f"{path.name} decodes to zero frames")
    src_fps = float(reader.get_avg_fps()) or float(fps)
    n_out = n_src if abs(src_fps - fps) < 1e-3 else max(1, int(math.floor(n_src * fps / src_fps + 1e-6)))
    wanted = (np.round(np.arange(n_out) * src_fps / fps).astype(np.int64)).clip(0, n_src - 1)
    pos = 0
    for out_idx, src_idx in enumerate(wanted):
        try:
            while pos < src_idx:
                reader.skip_frames(1)
                pos += 1
            img = reader.next().asnumpy()
            pos += 1
        except StopIteration:
            return
        except (RuntimeError, DECORDError) as err:
            raise VideoError("decode_error", f"{path.name} frame {src_idx}: {str(err)[:200]}") from err
        yield out_idx, img


def extract_clip(
    path: str | Path,
    clip_id: str,
    mirrored: bool,
    backend: AUBackend,
    cfg: ExtractConfig,
) -> pa.Table:
    """Every frame of one clip as a FRAMES_SCHEMA table (face-lost frames kept and flagged)."""
    frames: list[int] = []
    lms: list[np.ndarray | None] = []
    bss: list[np.ndarray | None] = []
    mats: list[np.ndarray | None] = []
    images: list[np.ndarray] | None = [] if backend.needs_images else None
    width = height = 0
    with VideoLandmarker(cfg) as lm:
        for idx, rgb in iter_clip_frames(path):
            height, width = rgb.shape[:2]
            obs = lm.detect(rgb, int(round(idx * 1000 / CLIP_FPS)) + 1)
            frames.append(idx)
            lms.append(None if obs is None else obs.landmarks)
            bss.append(None if obs is None else obs.blendshapes)
            mats.append(None if obs is None else obs.transform)
            if images is not None:
                images.append(rgb)
    if not frames:
        raise VideoError("no_frames", f"{Path(path).name} decodes to zero frames")
    return build_frames_table(clip_id, frames, lms, bss, mats, width, height, mirrored, backend, images)


def build_frames_table(
    clip_id: str,
    frames: list[int],
    lms: list[np.ndarray | None],
    bss: list[np.ndarray | None],
    mats: list[np.ndarray | None],
    width: int,
    height: int,
    mirrored: bool,
    backend: AUBackend,
    images: list[np.ndarray] | None = None,
) -> pa.Table:
    """Assemble columns; derived signals (pose, keypoints, proxies) are computed clip-wide."""
    t = len(frames)
    present = np.array([x is not None for x in lms], dtype=bool)
    lm_arr = np.full((t, 478, 3), np.nan, dtype=np.float32)
    bs_arr = np.full((t, 52), np.nan, dtype=np.float32)
    mat_arr = np.full((t, 4, 4), np.nan, dtype=np.float32)
    for i in np.flatnonzero(present):
        lm_arr[i], bs_arr[i], mat_arr[i] = lms[i], bss[i], mats[i]
    kp = lm_arr[:, list(KEYPOINT_INDICES), :]
    pose = np.full((t, 3), np.nan, dtype=np.float32)
    if present.any():
        pose[present] = head_pose_from_rotation(rotation_from_transform(mat_arr[present].reshape(-1, 16)))
    bs_for_proxies = bs_arr
    if mirrored:
        # DESIGN.md: swap every L/R channel and keypoint group, negate yaw and roll
        bs_for_proxies = mirror_blendshapes(bs_arr)
        kp = mirror_keypoint_groups(kp)
        pose[:, [0, 2]] *= -1
    au, gaze = backend.clip_proxies(bs_for_proxies, lm_arr, present, images)

    def col(arr: np.ndarray, n: int) -> pa.Array:
        flat = pa.array(arr.reshape(t * n).astype(np.float32), type=pa.float32())
        return pa.FixedSizeListArray.from_arrays(flat, n, mask=pa.array(~present))

    n_kp = N_KEYPOINTS * 3
    table = pa.table(
        {
            "clip_id": pa.array([clip_id] * t, pa.string()),
            "frame": pa.array(np.asarray(frames, dtype=np.int32)),
            "face_present": pa.array(present),
            "face_score": pa.array(present.astype(np.float32)),
            "landmarks": col(lm_arr, 478 * 3),
            "blendshapes": col(bs_arr, 52),
            "transform": col(mat_arr, 16),
            "keypoints": col(kp, n_kp),
            "au": col(au, au.shape[1]),
            "gaze": col(gaze, gaze.shape[1]),
            "head_pose": col(pose, 3),
            "width": pa.array(np.full(t, width, dtype=np.int32)),
            "height": pa.array(np.full(t, height, dtype=np.int32)),
        }
    )
    return table.cast(FRAMES_SCHEMA)


def list_column(table: pa.Table, name: str, n: int) -> np.ndarray:
    """A fixed-size list column as a (rows x n) float array, null rows as NaN."""
    column = table.column(name).combine_chunks()
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    out = np.full((len(column), n), np.nan, dtype=np.float32)
    if len(column) == 0:
        return out
    valid = ~np.asarray(column.is_null().to_numpy(zero_copy_only=False))
    flat = column.flatten().to_numpy(zero_copy_only=False).astype(np.float32)
    out[valid] = flat.reshape(-1, n)
    return out


FRAMES_GLOB = "frames-*.parquet"


def frames_files(folder: str | Path) -> list[Path]:
    """The frames parts of an extract output folder (or its single frames.parquet)."""
    folder = Path(folder)
    if (folder / "frames.parquet").exists():
        return [folder / "frames.parquet"]
    return sorted(folder.glob(FRAMES_GLOB))


def read_frames(folder: str | Path, columns: list[str] | None = None) -> pa.Table:
    """All frames of an extract output folder, with the declared schema (whole table in memory)."""
    import pyarrow.parquet as pq

    files = frames_files(folder)
    empty = FRAMES_SCHEMA.empty_table()
    if not files:
        return empty if columns is None else empty.select(columns)
    return pa.concat_tables([pq.read_table(f, columns=columns, schema=FRAMES_SCHEMA) for f in files])
