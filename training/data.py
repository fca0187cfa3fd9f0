"""Stage-2 training samples: windows of curated clips, and the loader that turns one into arrays.

Three layers, each deterministic so that a run can stop and resume on exactly the same stream:

* ``plan_windows`` lists every usable window (``n_frames`` consecutive face-present frames) with
  its reference frame, from the small columns of frames.parquet only; cheap, done once.
* ``window_positions`` orders the windows into the training stream: epoch after epoch of a
  permutation fixed by (seed, epoch). Position p always names the same window, so resuming at p
  replays the same tail without replaying the head.
* ``SampleLoader`` decodes one window's frames, reference, keypoints and audio. It holds only
  configuration, so Ray Data can run it as a map function (rows travel as ``Window.to_row()``
  dicts); this module itself never imports Ray.
"""

from __future__ import annotations

import uuid
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pyarrow.parquet as pq

from cogportrait.behavior.sources import read_clip_meta
from cogportrait.io.audio import read_wav
from cogportrait.io.video import VideoError, iter_frames, probe_video, read_frames_at
from cogportrait.schema import AUDIO_SAMPLE_RATE, CLIP_FPS, N_KEYPOINTS, TableError, identity_key, make_id

DEFAULT_MIN_REFERENCE_GAP = CLIP_FPS  # one second: a reference that is not a near copy of the window
DEFAULT_PROMPT_LABEL = "a person talking"  # the prompt's label when the clip has none
FRAMES_PLAN_COLUMNS = ("clip_id", "frame", "face_present")  # all plan_windows reads of frames.parquet
INT16_SCALE = 32768.0  # int16 PCM -> float in [-1, 1)


@dataclass(frozen=True)
class Window:
    """One training sample before decoding: which frames of which clip, and its reference frame.

    ``clip_path``/``audio_path`` are absolute, so a row can be loaded on any worker without the
    table it came from. ``identity`` is ``schema.identity_key`` (never empty): the key every stage
    groups a person's clips by.
    """

    sample_id: str
    clip_id: str
    start_frame: int
    n_frames: int
    reference_frame: int
    clip_path: str
    audio_path: str | None
    label: str | None
    identity: str

    @property
    def end_frame(self) -> int:
        """One past the window's last frame."""
        return self.start_frame + self.n_frames

    def to_row(self) -> dict[str, Any]:
        """A flat dict of scalars for Ray Data. Absent strings become "" (as in the repo's other
        job rows): every row then has the same Arrow types, whatever block it lands in."""
        row = asdict(self)
        row["audio_path"] = self.audio_path or ""
        row["label"] = self.label or ""
        return row

    @classmethod
    def from_row(cls, row: dict[str, Any]) -> Window:
        """The Window of a ``to_row`` dict; extra keys (``position``) are ignored."""
        return cls(
            sample_id=str(row["sample_id"]),
            clip_id=str(row["clip_id"]),
            start_frame=int(row["start_frame"]),
            n_frames=int(row["n_frames"]),
            reference_frame=int(row["reference_frame"]),
            clip_path=str(row["clip_path"]),
            audio_path=row.get("audio_path") or None,
            label=row.get("label") or None,
            identity=str(row["identity"]),
        )


def window_key(clip_id: str, start_frame: int, n_frames: int) -> str:
    """The id of a window's frames, before its reference is chosen (the reference draw's seed)."""
    return make_id("window", clip_id, start_frame, n_frames)


def sample_id_for(clip_id: str, start_frame: int, n_frames: int, reference_frame: int) -> str:
    return make_id("sample", clip_id, start_frame, n_frames, reference_frame)


def check_n_frames(n_frames: int) -> None:
    """The video VAE compresses time 4x after a first frame: windows must be 4k + 1 frames."""
    if n_frames < 1 or (n_frames - 1) % 4:
        raise ValueError(f"n_frames must be 4k + 1 (1, 5, 9, ..., 49, ...), got {n_frames}")


def _hash_index(n: int, *parts: object) -> int:
    """A deterministic draw in [0, n) from the parts (uuid5, so stable across library versions)."""
    return uuid.UUID(make_id(*parts)).int % n


def window_starts(present: np.ndarray, n_frames: int, stride: int) -> list[int]:
    """Starts 0, stride, 2*stride, ... of the windows whose every frame has a face."""
    n = len(present)
    if n < n_frames:
        return []
    # absent[i] = face-less frames in [0, i): a window is clean when its count does not grow
    absent = np.concatenate([[0], np.cumsum(~present)])
    starts = np.arange(0, n - n_frames + 1, stride)
    return [int(s) for s in starts[absent[starts + n_frames] == absent[starts]]]


def choose_reference(
    present: np.ndarray, start: int, n_frames: int, min_gap: int, seed: int, key: str
) -> int:
    """A face-present frame outside [start, start + n_frames), drawn from (seed, key).

    Preferred: one at least ``min_gap`` frames from the window (distance to its nearest frame), so
    the model has to carry identity across pose and expression rather than copy a neighbour.
    Else the farthest face-present frame outside (the earliest on a tie); else the window's own
    first frame, the only face the clip offers.
    """
    frames = np.flatnonzero(present)
    end = start + n_frames
    outside = frames[(frames < start) | (frames >= end)]
    if len(outside) == 0:
        return start
    gap = np.where(outside < start, start - outside, outside - (end - 1))
    far = outside[gap >= max(min_gap, 1)]
    if len(far):
        return int(far[_hash_index(len(far), "reference", seed, key)])
    return int(outside[np.argmax(gap)])


def _read_presence(frames_parquet: str | Path) -> dict[str, np.ndarray]:
    """clip_id -> face_present per frame (False where frames.parquet has no row for a frame)."""
    names = pq.read_schema(frames_parquet).names
    missing = [c for c in FRAMES_PLAN_COLUMNS if c not in names]
    if missing:
        raise TableError(f"{frames_parquet} lacks column(s) {missing}; expected the extract job's frames table")
    table = pq.read_table(frames_parquet, columns=list(FRAMES_PLAN_COLUMNS))
    ids = np.asarray(table.column("clip_id").to_numpy(zero_copy_only=False), dtype=object)
    frame = np.asarray(table.column("frame").to_numpy(zero_copy_only=False), dtype=np.int64)
    face = np.asarray(table.column("face_present").fill_null(False).to_numpy(zero_copy_only=False), dtype=bool)
    if len(frame) and frame.min() < 0:
        raise TableError(f"{frames_parquet} has negative frame numbers")
    out: dict[str, np.ndarray] = {}
    if not len(ids):
        return out
    uniq, inverse, counts = np.unique(ids, return_inverse=True, return_counts=True)
    order = np.argsort(inverse, kind="stable")  # rows grouped by clip, one pass over the table
    for clip_id, rows in zip(uniq, np.split(order, np.cumsum(counts)[:-1])):
        present = np.zeros(int(frame[rows].max()) + 1, dtype=bool)
        present[frame[rows]] = face[rows]
        out[str(clip_id)] = present
    return out


def plan_windows(
    clips_parquet: str | Path,
    frames_parquet: str | Path,
    n_frames: int,
    stride: int,
    seed: int,
    min_reference_gap: int = DEFAULT_MIN_REFERENCE_GAP,
) -> list[Window]:
    """Every window of ``n_frames`` face-present frames at ``stride``, with its reference frame.

    ``clips_parquet`` is curate's or extract's clips table (paths relative to its own folder);
    clips missing from either table give no window. Reads only the clip_id/frame/face_present
    columns of frames.parquet. Sorted by (clip_id, start_frame); the same inputs and seed always
    give the same list.
    """
    check_n_frames(n_frames)
    if stride < 1:
        raise ValueError(f"stride must be >= 1, got {stride}")
    if min_reference_gap < 0:
        raise ValueError(f"min_reference_gap must be >= 0, got {min_reference_gap}")
    if not Path(clips_parquet).is_file():
        raise FileNotFoundError(f"no clips table at {clips_parquet}")
    meta = read_clip_meta(clips_parquet)
    presence = _read_presence(frames_parquet)
    windows: list[Window] = []
    for clip_id in sorted(set(meta) & set(presence)):
        clip = meta[clip_id]
        present = presence[clip_id]
        audio = clip.get("audio_path") if clip.get("has_audio") else None
        for start in window_starts(present, n_frames, stride):
            ref = choose_reference(present, start, n_frames, min_reference_gap, seed, window_key(clip_id, start, n_frames))
            windows.append(
                Window(
                    sample_id=sample_id_for(clip_id, start, n_frames, ref),
                    clip_id=clip_id,
                    start_frame=start,
                    n_frames=n_frames,
                    reference_frame=ref,
                    clip_path=str(clip["clip_path"]),
                    audio_path=str(audio) if audio else None,
                    label=clip.get("label") or None,
                    identity=identity_key(clip.get("identity"), clip_id),
                )
            )
    return windows


def window_positions(windows: list[Window] | list[dict[str, Any]], n_samples: int, seed: int, start: int = 0) -> list[dict[str, Any]]:
    """The training stream from ``start`` to ``n_samples`` - 1: each a window row (or any row with a
    ``sample_id``, e.g. a KTO sample) plus ``position``.

    Position p lies in epoch p // len(windows); an epoch visits every window once, in the order of
    make_id("epoch", seed, epoch, sample_id) (the repo's hash-sort shuffle, as in the KTO split):
    it depends on (seed, epoch) and the windows, not on the list's order or numpy's generators.
    Only the epochs that ``start`` reaches are ordered, so a late resume costs no more than an
    early one.
    """
    if start < 0 or n_samples < start:
        raise ValueError(f"need 0 <= start <= n_samples, got start={start}, n_samples={n_samples}")
    if n_samples == start:
        return []
    if not windows:
        raise ValueError("no windows to draw samples from")
    n = len(windows)
    rows = [w.to_row() if isinstance(w, Window) else dict(w) for w in windows]
    out: list[dict[str, Any]] = []
    for epoch in range(start // n, (n_samples - 1) // n + 1):
        order = sorted(range(n), key=lambda i: (make_id("epoch", seed, epoch, rows[i]["sample_id"]), i))
        for offset in range(max(start - epoch * n, 0), min(n_samples - epoch * n, n)):
            out.append({**rows[order[offset]], "position": epoch * n + offset})
    return out


def resize_square(rgb: np.ndarray, resolution: int) -> np.ndarray:
    """An RGB frame as resolution x resolution (area filter: the clips are 512 and shrink)."""
    if rgb.shape[0] == resolution and rgb.shape[1] == resolution:
        return rgb
    return cv2.resize(rgb, (resolution, resolution), interpolation=cv2.INTER_AREA)


def audio_span(samples: np.ndarray, start_frame: int, n_frames: int, rate: int = AUDIO_SAMPLE_RATE) -> np.ndarray:
    """The samples under frames [start_frame, start_frame + n_frames): frame f starts at f / 25 s.

    Silence pads a track that ends early, so the span is always n_frames / 25 s long.
    """
    first = int(round(start_frame * rate / CLIP_FPS))
    n = int(round(n_frames * rate / CLIP_FPS))
    out = np.zeros(n, dtype=np.float32)
    part = samples[first : first + n]
    out[: len(part)] = part.astype(np.float32) / INT16_SCALE
    return out


class SampleLoader:
    """Turns a window row into the arrays of one training sample (see ``__call__``).

    Holds configuration only; decoding happens per call, of the window's frames and its
    reference alone. The same row always gives the same arrays.
    """

    def __init__(self, frames_parquet: str | Path, resolution: int, prompt_template: str = "{label}") -> None:
        if resolution < 1:
            raise ValueError(f"resolution must be >= 1, got {resolution}")
        try:
            prompt_template.format(label="", identity="")
        except (KeyError, IndexError, ValueError) as err:
            raise ValueError(f"prompt_template {prompt_template!r} may use only {{label}} and {{identity}}: {err}") from err
        self.frames_parquet = str(frames_parquet)
        self.resolution = int(resolution)
        self.prompt_template = prompt_template

    def prompt(self, window: Window) -> str:
        return self.prompt_template.format(label=window.label or DEFAULT_PROMPT_LABEL, identity=window.identity)

    def keypoints(self, window: Window) -> tuple[np.ndarray, np.ndarray]:
        """(F, 62, 3) keypoints of the window and (62, 3) of its reference, in [0, 1] of the crop.

        Reads only the rows of the window's frames and the reference (a filter pushed down to
        the clip's row group).
        """
        clip = ("clip_id", "=", window.clip_id)
        table = pq.read_table(
            self.frames_parquet,
            columns=["frame", "keypoints"],
            filters=[
                [clip, ("frame", ">=", window.start_frame), ("frame", "<", window.end_frame)],
                [clip, ("frame", "=", window.reference_frame)],
            ],
        )
        by_frame = dict(zip(table.column("frame").to_pylist(), table.column("keypoints").to_pylist()))
        wanted = [*range(window.start_frame, window.end_frame), window.reference_frame]
        bad = [f for f in wanted if by_frame.get(f) is None or len(by_frame[f]) != N_KEYPOINTS * 3]
        if bad:
            raise ValueError(f"clip {window.clip_id}: frames.parquet has no keypoints for frame(s) {bad[:5]}")
        points = np.asarray([by_frame[f] for f in wanted], dtype=np.float32).reshape(len(wanted), N_KEYPOINTS, 3)
        return points[:-1], points[-1]

    def frames(self, window: Window) -> tuple[np.ndarray, np.ndarray]:
        """(F, R, R, 3) uint8 frames of the window and the (R, R, 3) reference, decoded by seek."""
        info = probe_video(window.clip_path)
        decoded = dict(iter_frames(window.clip_path, info, start_frame=window.start_frame, end_frame=window.end_frame))
        if sorted(decoded) != list(range(window.start_frame, window.end_frame)):
            raise VideoError("decode_error", f"{Path(window.clip_path).name}: frames {window.start_frame}-{window.end_frame - 1} "
                             f"decode as {len(decoded)} frame(s)")
        if window.reference_frame in decoded:
            reference = decoded[window.reference_frame]
        else:
            got = read_frames_at(window.clip_path, info, [window.reference_frame])
            if window.reference_frame not in got:
                raise VideoError("decode_error", f"{Path(window.clip_path).name}: no frame {window.reference_frame}")
            reference = got[window.reference_frame]
        video = np.stack([resize_square(decoded[f], self.resolution) for f in range(window.start_frame, window.end_frame)])
        return video, resize_square(reference, self.resolution)

    def audio(self, window: Window) -> np.ndarray:
        """float32 samples under the window; silence when the clip has no audio."""
        n = int(round(window.n_frames * AUDIO_SAMPLE_RATE / CLIP_FPS))
        if window.audio_path is None:
            return np.zeros(n, dtype=np.float32)
        samples, rate, channels = read_wav(window.audio_path)
        if rate != AUDIO_SAMPLE_RATE or channels != 1:
            raise ValueError(f"{window.audio_path}: expected {AUDIO_SAMPLE_RATE} Hz mono, got {rate} Hz x {channels}")
        return audio_span(samples, window.start_frame, window.n_frames)

    def __call__(self, row: dict[str, Any]) -> dict[str, Any]:
        """video (F, R, R, 3) uint8 RGB, reference (R, R, 3) uint8, keypoints (F, 62, 3) float32,
        reference_keypoints (62, 3) float32, audio (F / 25 * 16000,) float32, prompt, and the
        window's sample_id, clip_id, start_frame, reference_frame; a ``window_positions`` row's
        ``position`` passes through (the trainer's resume point and noise seed)."""
        window = Window.from_row(row)
        video, reference = self.frames(window)
        keypoints, reference_keypoints = self.keypoints(window)
        passthrough = {"position": int(row["position"])} if "position" in row else {}
        return {
            **passthrough,
            "video": video,
            "reference": reference,
            "keypoints": keypoints,
            "reference_keypoints": reference_keypoints,
            "audio": self.audio(window),
            "prompt": self.prompt(window),
            "sample_id": window.sample_id,
            "clip_id": window.clip_id,
            "start_frame": window.start_frame,
            "reference_frame": window.reference_frame,
        }


# ------------------------------------------------------------------------------------------------
# KTO samples (issue 10): desirable real windows (kto_mine) and undesirable generated ones (kto negatives)
# ------------------------------------------------------------------------------------------------
KTO_ROW_COLUMNS = ("sample_id", "category", "desirable", "split", "clip_id", "start_frame", "end_frame", "reference_frame",
                   "audio_path", "audio_start_s", "keypoints", "prompt", "video_path")


def kto_rows(tables: list[str | Path], split: str, n_frames: int) -> list[dict[str, Any]]:
    """The rows of the KTO tables (``KTO_SCHEMA`` columns: the desirable table and the undesirable one
    share them) of ``split`` ("all" for every row) whose window holds ``n_frames`` frames, sorted by id.

    Paths are as the tables store them (relative to the working directory, as ``kto_mine`` writes
    them), made absolute here so a row loads on any worker. Keypoints travel as a flat list.
    """
    check_n_frames(n_frames)
    rows: list[dict[str, Any]] = []
    for table in tables:
        for row in pq.read_table(table, columns=list(KTO_ROW_COLUMNS)).to_pylist():
            if split != "all" and row["split"] != split:
                continue
            if len(row["keypoints"]) < n_frames:
                continue
            for key in ("audio_path", "video_path"):
                row[key] = str(Path(row[key]).resolve()) if row[key] else ""
            row["keypoints"] = np.asarray(row["keypoints"][:n_frames], dtype=np.float32).reshape(-1).tolist()
            rows.append(row)
    return sorted(rows, key=lambda r: r["sample_id"])


class KtoSampleLoader:
    """A KTO row -> the arrays of one sample (as ``SampleLoader``'s, plus ``desirable``): the first
    ``n_frames`` frames of its video (the real clip's window, or the generated video, whose frame i
    is window frame i), the reference frame from the real clip, the row's keypoints, audio and prompt."""

    def __init__(self, clips_parquet: str | Path, resolution: int, n_frames: int) -> None:
        check_n_frames(n_frames)
        self.clips = {k: v["clip_path"] for k, v in read_clip_meta(clips_parquet).items()}
        self.resolution = int(resolution)
        self.n_frames = int(n_frames)

    def __call__(self, row: dict[str, Any]) -> dict[str, Any]:
        f = self.n_frames
        if row["clip_id"] not in self.clips:
            raise ValueError(f"KTO sample {row['sample_id']}: clip {row['clip_id']} is not in the clips table")
        clip = self.clips[row["clip_id"]]
        desirable = bool(row["desirable"])
        first = int(row["start_frame"]) if desirable else 0  # a generated video starts at the window's first frame
        info = probe_video(row["video_path"])
        decoded = dict(iter_frames(row["video_path"], info, start_frame=first, end_frame=first + f))
        if len(decoded) != f:
            raise VideoError("decode_error", f"{Path(row['video_path']).name}: {len(decoded)} of {f} frames from {first}")
        reference = read_frames_at(clip, probe_video(clip), [int(row["reference_frame"])])
        if int(row["reference_frame"]) not in reference:
            raise VideoError("decode_error", f"{Path(clip).name}: no frame {row['reference_frame']}")
        audio = np.zeros(int(round(f * AUDIO_SAMPLE_RATE / CLIP_FPS)), dtype=np.float32)
        if row["audio_path"]:
            samples, _, _ = read_wav(row["audio_path"])
            audio = audio_span(samples, int(round(float(row["audio_start_s"]) * CLIP_FPS)), f)
        return {
            "position": int(row["position"]),
            "sample_id": row["sample_id"],
            "desirable": desirable,
            "video": np.stack([resize_square(decoded[i], self.resolution) for i in sorted(decoded)]),
            "reference": resize_square(reference[int(row["reference_frame"])], self.resolution),
            "keypoints": np.asarray(row["keypoints"], dtype=np.float32).reshape(f, N_KEYPOINTS, 2),
            "audio": audio,
            "prompt": row["prompt"] or DEFAULT_PROMPT_LABEL,
        }
