"""Scene splitting with PySceneDetect's detectors, fed from one streaming decode pass."""

from __future__ import annotations

import os
from dataclasses import dataclass

import cv2
import numpy as np
from scenedetect import AdaptiveDetector, ContentDetector, FrameTimecode

from cogportrait.io.video import VideoError, VideoInfo, iter_frames


@dataclass(frozen=True)
class SceneResult:
    times: np.ndarray  # decoded timestamp of every frame, seconds (float64)
    cuts: list[int]  # first frame index of each new shot
    decode_error: str  # "" when the whole stream decoded

    @property
    def n_frames(self) -> int:
        return len(self.times)


def make_detector(kind: str, threshold: float, min_len_frames: int) -> AdaptiveDetector | ContentDetector:
    if kind == "adaptive":
        return AdaptiveDetector(adaptive_threshold=threshold, min_scene_len=min_len_frames)
    if kind == "content":
        return ContentDetector(threshold=threshold, min_scene_len=min_len_frames)
    raise ValueError(f"unknown scene detector {kind!r}; valid: adaptive, content")


def detect_scenes(
    path: str | os.PathLike, info: VideoInfo, kind: str, threshold: float, min_len_frames: int, width: int
) -> SceneResult:
    """Decode every frame once (shrunk to ``width``), record its time and find hard cuts.

    A stream that breaks part-way keeps what decoded; the error is reported for the remainder.
    """
    detector = make_detector(kind, threshold, min_len_frames)
    fps = info.fps
    times: list[float] = []
    cuts: list[int] = []
    error = ""
    last_tc: FrameTimecode | None = None
    try:
        for idx, bgr in _iter_with_times(path, info, width, times):
            last_tc = FrameTimecode(idx, fps=fps)
            cuts.extend(tc.frame_num for tc in detector.process_frame(last_tc, bgr))
    except VideoError as err:
        error = err.detail
    if last_tc is not None:
        cuts.extend(tc.frame_num for tc in detector.post_process(last_tc))
    n = len(times)
    cuts = sorted({c for c in cuts if 0 < c < n})
    return SceneResult(np.asarray(times, dtype=np.float64), cuts, error)


def _iter_with_times(path, info: VideoInfo, width: int, times: list[float]):
    """Decode order is the frame index; each frame's timestamp is appended to ``times``.

    Frames come out as small BGR images: shrunk on the decoded YUV planes and converted once,
    which costs a fifth of FFmpeg's scaler doing both.
    """
    import av  # local: keeps the module importable for docs without FFmpeg

    from cogportrait.io.video import rotate_image

    coded_w, coded_h = info.coded_size
    planar = coded_w % 2 == 0 and coded_h % 2 == 0
    tw = min(width, coded_w) // 2 * 2
    th = max(2, int(round(coded_h * tw / coded_w / 2)) * 2)
    try:
        with av.open(str(path)) as container:
            stream = container.streams.video[0]
            stream.codec_context.thread_count = 1
            last_t = -np.inf
            for frame in container.decode(stream):
                t = float(frame.time) if frame.time is not None else (len(times) / info.fps)
                if t <= last_t:  # repeated timestamp: not a new frame for our purposes
                    continue
                last_t = t
                times.append(t - info.start_time_s)
                if planar and frame.format.name in ("yuv420p", "yuvj420p") and (frame.width, frame.height) == (coded_w, coded_h):
                    img = small_bgr_from_yuv420(frame.to_ndarray(format="yuv420p"), coded_w, coded_h, tw, th)
                else:
                    img = frame.to_ndarray(format="bgr24", width=tw, height=th)
                yield len(times) - 1, rotate_image(img, info.quarter_turns)
    except av.FFmpegError as err:
        raise VideoError("decode_error", f"{os.path.basename(path)}: {err}") from err


def small_bgr_from_yuv420(yuv: np.ndarray, width: int, height: int, tw: int, th: int) -> np.ndarray:
    """Area-shrink each plane of a planar 4:2:0 frame, then convert the small frame to BGR."""
    q = (height // 2) * (width // 2)
    flat = yuv[height:].reshape(-1)
    planes = [
        cv2.resize(yuv[:height], (tw, th), interpolation=cv2.INTER_AREA),
        cv2.resize(flat[:q].reshape(height // 2, width // 2), (tw // 2, th // 2), interpolation=cv2.INTER_AREA),
        cv2.resize(flat[q : 2 * q].reshape(height // 2, width // 2), (tw // 2, th // 2), interpolation=cv2.INTER_AREA),
    ]
    packed = np.concatenate([p.reshape(-1) for p in planes]).reshape(th * 3 // 2, tw)
    return cv2.cvtColor(packed, cv2.COLOR_YUV2BGR_I420)


__all__ = ["SceneResult", "detect_scenes", "make_detector", "iter_frames"]
