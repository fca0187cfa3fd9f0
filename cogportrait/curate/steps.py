"""Row-level steps of the curate job (Ray-free; ``pipelines/curate.py`` wires them into Ray Data).

A row is one video, then one span of it. Every row carries every key of ``ROW_SCHEMA`` with
one declared type: arrays travel as typed list columns (frame times, face track, crop track),
never as JSON strings or raw bytes, and ``rows_table`` turns rows into an Arrow
table of that schema, so every Ray block has the same schema (an empty list on a rejected row
stays ``list<double>``, not ``list<null>``). A rejected row keeps flowing through later steps
untouched, so every input ends in exactly one output row: a clip, or a reject with a reason from
the closed vocabulary.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pyarrow as pa

from cogportrait.config import CurateConfig
from cogportrait.curate.crop import crop_track, write_cropped_clip
from cogportrait.curate.filters import (
    TextSample, caption_possible, line_boxes, motion_decision, quality_decision, text_decision,
)
from cogportrait.curate.scan import Shot, VideoScan, scan_video
from cogportrait.curate.spans import Span, apply_duration_limits, segment_face_runs, span_seconds
from cogportrait.curate.text import TextDetector, decode_frames, stack_bands
from cogportrait.curate.tracking import FaceTracker, motion_scores
from cogportrait.io.audio import extract_audio_span
from cogportrait.io.video import VideoError, VideoInfo, iter_frames, probe_video, resample_times
from cogportrait.schema import (
    AUDIO_SAMPLE_RATE,
    CLIP_FPS,
    CLIP_SIZE,
    CURATE_ROW_SCHEMA as ROW_SCHEMA,
    REJECT_STAGES,
    check_reason,
    clip_id_for,
)

Row = dict[str, Any]
NAN = float("nan")

ROW_DEFAULTS: Row = {
    # manifest
    "video_id": "", "path": "", "source": "", "license": "", "label": "", "identity": "unknown",
    "mirrored": False, "manifest_row": -1,
    # probe
    "fps": NAN, "width": -1, "height": -1, "codec": "", "start_time_s": 0.0, "rotation": 0, "has_audio_stream": False,
    "n_src_frames": -1, "duration_s": NAN,
    # span (source frames, end exclusive) and the timestamp of each of its frames
    "scene_index": -1, "start_frame": -1, "end_frame": -1, "start_s": NAN, "end_s": NAN, "times": [],
    # face track: usable samples (source frame, face box x0, y0, x1, y1 px)
    "track_frames": [], "track_boxes": [],
    # frames kept by the scan for the text step (source index, JPEG); emptied by it
    "text_frames": [], "text_jpegs": [],
    "face_size_px": NAN, "face_score": NAN, "face_coverage": NAN,
    "sharpness": NAN, "brightness": NAN, "motion_score": NAN, "head_speed": NAN, "text_score": NAN,
    "text_kind": "",
    # outputs: crop box (median x0, y0, x1, y1) and per clip frame (cx, cy, side), source px
    "clip_id": "", "clip_path": "", "audio_path": "", "has_audio": False, "n_frames": 0,
    "crop_box": [], "crop_track": [],
    # reject
    "reject_stage": "", "reject_reason": "", "reject_detail": "",
    # rows this video makes in all: set by the scan on the rows of its last shot (0 = not known yet)
    "video_rows": 0,
    # seconds spent per step (attributed to the first row a step emits for an input); they go to
    # metrics.json only, never into a table
    "t_probe": 0.0, "t_scenes": 0.0, "t_track": 0.0, "t_text": 0.0, "t_filter": 0.0, "t_crop": 0.0,
}
assert ROW_SCHEMA.names == list(ROW_DEFAULTS), "ROW_SCHEMA and ROW_DEFAULTS list the same keys in the same order"


def rows_table(rows: list[Row]) -> pa.Table:
    """Rows as an Arrow table of ``ROW_SCHEMA`` (a key missing from a row is an error)."""
    for row in rows:
        if row.keys() != ROW_DEFAULTS.keys():
            raise KeyError(f"row keys differ from ROW_SCHEMA: {sorted(row.keys() ^ ROW_DEFAULTS.keys())}")
    return pa.Table.from_pylist(rows, schema=ROW_SCHEMA)


def new_row(manifest_row: Row) -> Row:
    row = dict(ROW_DEFAULTS)
    row.update(manifest_row)
    return row


def rejected(row: Row) -> bool:
    return bool(row["reject_reason"])


def reject(row: Row, stage: str, reason: str, detail: str = "") -> Row:
    check_reason(stage, reason)
    row["reject_stage"], row["reject_reason"], row["reject_detail"] = stage, reason, detail
    return row


def video_info(row: Row) -> VideoInfo:
    return VideoInfo(
        fps=row["fps"], width=row["width"], height=row["height"], n_frames=row["n_src_frames"],
        duration_s=row["duration_s"], has_audio=row["has_audio_stream"], codec=row["codec"],
        start_time_s=row["start_time_s"], rotation=row["rotation"],
    )


def span_times(row: Row) -> np.ndarray:
    return np.asarray(row["times"], dtype=np.float64)


def track_arrays(row: Row) -> tuple[np.ndarray, np.ndarray]:
    """(sample frames, N x 4 face boxes) of the span's usable face samples."""
    return np.asarray(row["track_frames"], dtype=np.int64), np.asarray(row["track_boxes"], dtype=np.float64).reshape(-1, 4)


def with_span(row: Row, span: Span, times: np.ndarray, frame_period: float) -> Row:
    """A copy of ``row`` narrowed to ``span`` (indices into the same video); times re-sliced."""
    out = dict(row)
    offset = row["start_frame"] if row["start_frame"] >= 0 else 0
    local = times[span.start - offset : span.end - offset]
    out["start_frame"], out["end_frame"] = span.start, span.end
    out["start_s"], out["end_s"] = span_seconds(times, span.start - offset, span.end - offset, frame_period)
    out["times"] = np.asarray(local, dtype=np.float64).tolist()
    return out


# ---------------------------------------------------------------------------------------------
# steps
# ---------------------------------------------------------------------------------------------
def probe_step(row: Row, cfg: CurateConfig) -> Row:
    """1:1. Open the file, check it decodes, read geometry and timing."""
    t0 = time.perf_counter()
    try:
        info = probe_video(row["path"])
    except VideoError as err:
        return reject(row, "probe", err.reason, err.detail)
    finally:
        row["t_probe"] = time.perf_counter() - t0
    row.update(
        fps=info.fps, width=info.width, height=info.height, codec=info.codec, start_time_s=info.start_time_s, rotation=info.rotation,
        has_audio_stream=info.has_audio, n_src_frames=info.n_frames, duration_s=info.duration_s,
    )
    if info.duration_s + 1e-6 < cfg.min_duration_s:
        reject(row, "probe", "too_short", f"{info.duration_s:.2f} s < {cfg.min_duration_s} s")
        row["start_s"], row["end_s"] = 0.0, info.duration_s
    return row


def single_threaded() -> None:
    """One OpenCV thread per worker process: the job runs one worker per core."""
    cv2.setNumThreads(1)


def scan_step(row: Row, cfg: CurateConfig, tracker: FaceTracker) -> Iterator[list[Row]]:
    """1:N, streamed per shot. One decode pass (``scan.py``): frame times, shot cuts and face
    samples; each shot is cut to the duration limits, each piece split into face runs (gaps longer
    than ``max_face_gap_s`` are rejected), each run cut to the limits again.

    The rows of the video's last shot carry ``video_rows``, the number of rows the video makes in
    all (every later step is 1:1), so the driver knows when a video is complete.
    """
    if rejected(row):
        row["video_rows"] = 1
        yield [row]
        return
    single_threaded()
    t0 = time.perf_counter()
    info = video_info(row)
    scan, shots = scan_video(
        row["path"], info, tracker, 1.0 / cfg.track_fps, cfg.scene_detector, cfg.scene_threshold, cfg.scene_min_len_frames,
        cfg.scene_downscale_px, cfg.text_candidates, max(1, int(round(cfg.track_fps * cfg.text_candidate_s))),
    )
    emitted, pending = 0, None
    for scene_index, shot in enumerate(shots):
        if pending is not None:
            emitted += len(pending)
            yield pending
        pending = _shot_rows(row, cfg, scan, shot, scene_index)
    if pending is None:  # nothing decoded
        row["t_scenes"], row["video_rows"] = time.perf_counter() - t0, 1
        yield [reject(row, "scenes", "undecodable", scan.decode_error or "no frame decoded")]
        return
    missing = info.n_frames - scan.n_frames
    if scan.decode_error or missing > 0.5 * info.fps:
        # the part after a break is lost to decoding: record it, with its span, as a reject
        times, period = np.asarray(scan.times), 1.0 / _decoded_fps(scan, info)
        detail = scan.decode_error or f"container claims {info.n_frames} frames, {scan.n_frames} decode"
        tail = _with_video_timing(row, scan, info)
        tail["start_frame"], tail["end_frame"] = scan.n_frames, max(scan.n_frames, info.n_frames)
        tail["start_s"], tail["end_s"] = float(times[-1] + period), max(float(times[-1] + period), info.duration_s)
        tail["times"], tail["scene_index"] = [], pending[-1]["scene_index"] + 1
        pending.append(reject(tail, "scenes", "decode_error", detail))
    for r in pending:
        r["video_rows"] = emitted + len(pending)
    yield pending


def _decoded_fps(scan: VideoScan, info: VideoInfo) -> float:
    """The stream's rate from its decoded timestamps (VFR and wrong container rates included)."""
    t = scan.times
    return (len(t) - 1) / t[-1] if len(t) > 1 and t[-1] > 0 else info.fps


def _with_video_timing(row: Row, scan: VideoScan, info: VideoInfo) -> Row:
    out = dict(row)
    out["fps"], out["n_src_frames"] = float(_decoded_fps(scan, info)), scan.n_frames
    return out


def _shot_rows(row: Row, cfg: CurateConfig, scan: VideoScan, shot: Shot, scene_index: int) -> list[Row]:
    """The rows of one shot: duration limits, face runs, duration limits again."""
    info = video_info(row)
    base = _with_video_timing(row, scan, info)  # fps from the frames decoded so far: exact for the shot
    base["scene_index"] = scene_index
    fps = base["fps"]
    period = 1.0 / fps
    times = np.asarray(scan.times, dtype=np.float64)
    max_gap = int(np.floor(cfg.max_face_gap_s * cfg.track_fps + 1e-6))  # in samples
    out: list[Row] = []
    for piece in apply_duration_limits(Span(shot.start, shot.end), times, period, cfg.min_duration_s, cfg.max_duration_s):
        child = with_span(base, piece, times, period)
        if piece.reason:
            out.append(reject(child, "scenes", piece.reason, f"{child['end_s'] - child['start_s']:.2f} s < {cfg.min_duration_s} s"))
            continue
        samples = [s for s in shot.samples if piece.start <= s.frame < piece.end]
        if not samples:
            out.append(reject(child, "face_track", "decode_error", "no frame sampled in the span"))
            continue
        runs = segment_face_runs([s.frame for s in samples], [s.label for s in samples], piece.end, max_gap)
        # samples sit on a time grid from t = 0: the frames before a piece's first sample go with it
        runs[0] = Span(piece.start, runs[0].end, runs[0].reason)
        for run in runs:
            parts = [run] if run.reason else apply_duration_limits(run, times, period, cfg.min_duration_s, cfg.max_duration_s)
            for part in parts:
                span_row = with_span(base, part, times, period)
                span_row["scene_index"] = scene_index
                if part.reason:
                    reject(span_row, "face_track", part.reason, f"{span_row['end_s'] - span_row['start_s']:.2f} s")
                else:
                    _attach_track(span_row, [s for s in samples if part.start <= s.frame < part.end], period)
                    wanted = pick_spread(sorted(shot.candidates), part.start, part.end, cfg.text_frames)
                    span_row["text_frames"] = wanted
                    span_row["text_jpegs"] = [shot.candidates[i] for i in wanted]
                out.append(span_row)
    for r in out:
        r["t_scenes"] = r["t_track"] = 0.0
    out[0]["t_scenes"], out[0]["t_track"] = shot.scene_seconds, shot.track_seconds
    return out


def pick_spread(available: list[int], start: int, end: int, count: int) -> list[int]:
    """Up to ``count`` of the ``available`` frame indices inside [start, end), each the nearest to
    one of ``count`` points evenly spread over the span (ascending, no repeats)."""
    inside = np.asarray([i for i in available if start <= i < end], dtype=np.int64)
    if len(inside) == 0:
        return []
    return sorted({int(inside[np.argmin(np.abs(inside - t))]) for t in spread_points(start, end, count)})


def spread_points(start: int, end: int, count: int) -> np.ndarray:
    """``count`` frame positions evenly spread over [start, end): the middles of equal parts."""
    return start + (np.arange(count) + 0.5) * (end - start) / count


def _attach_track(row: Row, samples: list, frame_period: float) -> None:
    usable = [s for s in samples if s.label == "ok"]
    boxes = np.array([s.box for s in usable], dtype=np.float64)
    sides = np.maximum(boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1])
    row["track_frames"] = [int(s.frame) for s in usable]
    row["track_boxes"] = np.round(boxes, 2).tolist()
    row["face_size_px"] = float(np.median(sides))
    row["face_score"] = float(np.mean([s.score for s in usable]))
    row["face_coverage"] = len(usable) / max(1, len(samples))
    row["sharpness"] = float(np.nanmedian([s.sharpness for s in usable]))
    row["brightness"] = float(np.nanmedian([s.brightness for s in usable]))
    row["motion_score"], row["head_speed"] = motion_scores(usable, frame_period)


def text_step(row: Row, cfg: CurateConfig, detector: TextDetector) -> Row:
    """1:1. Captions and tickers in the top and bottom bands of a few frames spread over the
    span (rule in filters.py); records ``text_score`` and ``text_kind`` on every span it sees.

    Uses the frames the scan kept; decodes only when none of them fell in this span. Stops
    detecting once no caption is possible (``caption_possible``).
    """
    if rejected(row):
        return row
    t0 = time.perf_counter()
    frames = decode_frames(row["text_frames"], row["text_jpegs"])
    row["text_frames"], row["text_jpegs"] = [], []
    if not frames:
        try:
            frames = _decode_text_frames(row, cfg.text_frames)
        except VideoError as err:
            row["t_text"] = time.perf_counter() - t0
            return reject(row, "text", err.reason, err.detail)
    sample_frames, boxes = track_arrays(row)
    layout, samples = None, []
    for idx, rgb in sorted(frames.items()):
        if not caption_possible(samples, len(frames), cfg):
            break
        layout = layout or detector.layout(rgb.shape[1], rgb.shape[0], cfg.text_band_top, cfg.text_band_bottom)
        face = tuple(boxes[int(np.argmin(np.abs(sample_frames - idx)))]) if len(sample_frames) else None
        stack = stack_bands(rgb, layout)
        lines, bands = line_boxes(detector.detect(stack), layout, face, cfg)
        samples.append(TextSample(idx, cv2.cvtColor(stack, cv2.COLOR_RGB2GRAY), lines, bands, face))
    verdict = text_decision(samples, layout, cfg)
    row["text_score"], row["text_kind"] = verdict.score, verdict.kind
    row["t_text"] = time.perf_counter() - t0
    if not verdict.keep:
        reject(row, "text", verdict.reason, verdict.detail)
    return row


def _decode_text_frames(row: Row, count: int) -> dict[int, np.ndarray]:
    info, times = video_info(row), span_times(row)
    start = row["start_frame"]
    wanted = sorted({int(p) for p in spread_points(start, row["end_frame"], count)})
    got = {}
    for idx, rgb in iter_frames(row["path"], info, wanted[0], wanted[-1] + 1, times=times[wanted[0] - start :]):
        if idx in wanted:
            got[idx] = rgb
    return got


def filter_step(row: Row, cfg: CurateConfig) -> Row:
    """1:1. Quality (sharpness, exposure) and motion (static vs chaotic) thresholds on tracked scores."""
    if rejected(row):
        return row
    keep, reason = quality_decision(row["sharpness"], row["brightness"], cfg)
    if not keep:
        return reject(row, "quality", reason, f"sharpness {row['sharpness']:.1f}, brightness {row['brightness']:.1f}")
    keep, reason = motion_decision(row["motion_score"], row["head_speed"], cfg)
    if not keep:
        return reject(row, "motion", reason, f"motion {row['motion_score']:.4f}, head speed {row['head_speed']:.2f}/s")
    return row


def crop_step(row: Row, cfg: CurateConfig, out_dir: str) -> Row:
    """1:1. Smoothed 1.5x face crop at 512², resampled to 25 fps, plus 16 kHz mono audio."""
    if rejected(row):
        return row
    single_threaded()
    t0 = time.perf_counter()
    info, times = video_info(row), span_times(row)
    out_times = resample_times(row["start_s"], row["end_s"], CLIP_FPS)
    if len(out_times) == 0:
        row["t_crop"] = time.perf_counter() - t0
        return reject(row, "crop", "no_frames", f"{row['end_s'] - row['start_s']:.3f} s span")
    sample_frames, boxes = track_arrays(row)
    ctrack = crop_track(
        times[sample_frames - row["start_frame"]], boxes, out_times, row["width"], row["height"],
        cfg.crop_scale, cfg.crop_smooth_s, CLIP_FPS,
    )
    clip_id = clip_id_for(row["video_id"], row["start_frame"], row["end_frame"])
    clip_rel, audio_rel = f"clips/{clip_id}.mp4", f"audio/{clip_id}.wav"
    try:
        n = write_cropped_clip(
            row["path"], info, row["start_frame"], row["end_frame"], times, out_times, ctrack,
            Path(out_dir) / clip_rel, CLIP_SIZE, CLIP_FPS, cfg.encode_preset, cfg.encode_crf,
        )
        # the audio at the frames' moments: spans count from the first video frame, the container's
        # timeline from its own zero (the audio may start before the video)
        audio_start = row["start_time_s"] + row["start_s"]
        has_audio = row["has_audio_stream"] and extract_audio_span(
            row["path"], audio_start, audio_start + len(out_times) / CLIP_FPS, Path(out_dir) / audio_rel, AUDIO_SAMPLE_RATE
        )
    except VideoError as err:
        row["t_crop"] = time.perf_counter() - t0
        return reject(row, "crop", err.reason, err.detail)
    side = np.median(ctrack[:, 2])
    cx, cy = np.median(ctrack[:, 0]), np.median(ctrack[:, 1])
    row.update(
        clip_id=clip_id, clip_path=clip_rel, audio_path=audio_rel if has_audio else "", has_audio=bool(has_audio),
        n_frames=int(n), crop_box=np.array([cx - side / 2, cy - side / 2, cx + side / 2, cy + side / 2], np.float32).tolist(),
        crop_track=ctrack.astype(np.float32).tolist(), t_crop=time.perf_counter() - t0,
    )
    return row


# ---------------------------------------------------------------------------------------------
# rows -> table rows, and the fixed order of the tables
# ---------------------------------------------------------------------------------------------
# clips.parquet: by video, then by span start (spans of a video never overlap: a total order)
CLIPS_SORT_KEYS = [("video_id", "ascending"), ("start_frame", "ascending")]


def reject_sort_key(rec: Row) -> tuple:
    """rejects.parquet order: manifest row, then span start (a whole-input reject, without span,
    first), span end, stage in pipeline order, reason, detail. Each manifest row has one
    whole-input reject or non-overlapping spans, so the first two already decide; the rest makes
    the order total whatever the rows hold."""
    def num(key: str) -> float:  # a missing or null value sorts first
        v = rec.get(key)
        return -1 if v is None else v

    return (
        num("manifest_row"), num("start_frame"), num("end_frame"), num("start_s"),
        REJECT_STAGES.index(rec["stage"]), rec["reason"], rec.get("detail") or "", rec.get("video_id") or "", rec.get("path") or "",
    )


def clip_record(row: Row) -> Row:
    """The clips-table row (CLIPS_SCHEMA) of a kept span."""
    return {
        "clip_id": row["clip_id"], "video_id": row["video_id"], "clip_path": row["clip_path"],
        "audio_path": row["audio_path"] or None, "has_audio": row["has_audio"],
        "start_s": row["start_s"], "end_s": row["end_s"], "start_frame": row["start_frame"], "end_frame": row["end_frame"],
        "fps": row["fps"], "n_frames": row["n_frames"], "scene_index": row["scene_index"],
        "crop_box": row["crop_box"], "crop_track": row["crop_track"],
        "source_width": row["width"], "source_height": row["height"],
        "label": row["label"], "identity": row["identity"], "mirrored": row["mirrored"],
        "source": row["source"], "license": row["license"],
        **{k: row[k] for k in ("face_size_px", "face_score", "face_coverage", "text_score", "text_kind", "sharpness", "brightness", "motion_score", "head_speed")},
    }


def reject_record(row: Row) -> Row:
    """The rejects-table row (REJECTS_SCHEMA) of a rejected video or span."""
    has_span = row["start_frame"] >= 0 or np.isfinite(row["start_s"])
    return {
        "video_id": row["video_id"], "stage": row["reject_stage"], "reason": row["reject_reason"],
        "detail": row["reject_detail"], "manifest_row": row["manifest_row"], "path": row["path"],
        "scene_index": row["scene_index"] if row["scene_index"] >= 0 else None,
        "start_s": row["start_s"] if has_span and np.isfinite(row["start_s"]) else None,
        "end_s": row["end_s"] if has_span and np.isfinite(row["end_s"]) else None,
        "start_frame": row["start_frame"] if row["start_frame"] >= 0 else None,
        "end_frame": row["end_frame"] if row["end_frame"] >= 0 else None,
    }
