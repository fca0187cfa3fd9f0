"""One decode pass over a video: frame times, shot cuts, face samples and text candidates.

Decoding an H.264 stream costs as much as everything done with its frames, so the scenes and
face-tracking passes share it: every frame is shrunk (on its YUV planes) for PySceneDetect, and
the frames on the track rate's time grid (from t = 0) are converted once at full size
for the face detector and, now and then, kept as a JPEG for the text filter.

Memory is flat in video length: shots are handed out as soon as the scene detector confirms the
cut that ends them, with only their own face samples (a box, a few scores and a 32² thumbnail
each) and at most ``text_capacity`` candidate frames, evenly spread over the shot however long
it is (``FrameReservoir``). What is kept for the whole video is one timestamp per frame.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import cv2
import numpy as np
from scenedetect import AdaptiveDetector, ContentDetector, FrameTimecode

from cogportrait.curate.text import jpeg_bytes
from cogportrait.curate.tracking import FaceSample, FaceTracker
from cogportrait.io.video import VideoError, VideoInfo, Yuv420, rotate_image, yuv420_planes


def make_detector(kind: str, threshold: float, min_len_frames: int) -> AdaptiveDetector | ContentDetector:
    if kind == "adaptive":
        return AdaptiveDetector(adaptive_threshold=threshold, min_scene_len=min_len_frames)
    if kind == "content":
        return ContentDetector(threshold=threshold, min_scene_len=min_len_frames)
    raise ValueError(f"unknown scene detector {kind!r}; valid: adaptive, content")


class FrameReservoir:
    """Evenly spread frames of a stream of unknown length in bounded memory.

    Keeps every ``stride``-th offered frame (JPEG); when more than ``capacity`` are held it drops
    every other one and doubles the stride, so what is held always covers the stream seen so far
    at an even spacing. A span then picks the held frames nearest to its own sample points.
    """

    def __init__(self, capacity: int, stride: int, quality: int = 90) -> None:
        self.capacity, self.stride, self.quality = max(2, capacity), max(1, stride), quality
        self.initial_stride = self.stride
        self._count = 0
        self._held: list[tuple[int, int, bytes]] = []  # (offer number, frame index, JPEG)

    def offer(self, frame_index: int, rgb: np.ndarray) -> None:
        k = self._count
        self._count += 1
        if k % self.stride:
            return
        self._held.append((k, frame_index, jpeg_bytes(rgb, self.quality)))
        if len(self._held) > self.capacity:
            self.stride *= 2
            self._held = [h for h in self._held if h[0] % self.stride == 0]

    def frames(self) -> dict[int, bytes]:
        return {idx: jpg for _, idx, jpg in self._held}

    def split_off(self, first_index: int) -> FrameReservoir:
        """Move the held frames from ``first_index`` on into a new reservoir (a shot cut there)."""
        tail = FrameReservoir(self.capacity, self.initial_stride, self.quality)
        tail._held = [h for h in self._held if h[1] >= first_index]
        tail._count = self._count
        self._held = [h for h in self._held if h[1] < first_index]
        return tail


@dataclass
class Shot:
    """A shot [start, end) (source frame indices) with what the scan measured in it."""

    start: int
    end: int  # -1 while the shot is open
    samples: list[FaceSample]
    reservoir: FrameReservoir  # candidate frames for the text filter
    scene_seconds: float = 0.0  # decode + scene detection time spent on the shot
    track_seconds: float = 0.0  # face detection time spent on the shot

    @property
    def candidates(self) -> dict[int, bytes]:
        """Frame index -> JPEG of the frames held for the text filter."""
        return self.reservoir.frames()


@dataclass
class VideoScan:
    """Scan state; ``shots()`` streams the shots, the rest is complete once it is exhausted."""

    times: list[float] = field(default_factory=list)  # decoded timestamp of every frame (s, from 0)
    decode_error: str = ""  # "" when the whole stream decoded

    @property
    def n_frames(self) -> int:
        return len(self.times)


def scan_video(
    path: str | os.PathLike,
    info: VideoInfo,
    tracker: FaceTracker,
    sample_period_s: float,
    scene_kind: str,
    scene_threshold: float,
    scene_min_len_frames: int,
    scene_width: int,
    text_capacity: int,
    text_stride: int,
) -> tuple[VideoScan, Iterator[Shot]]:
    """Start scanning; returns the scan state and the generator of its shots (in order)."""
    scan = VideoScan()
    return scan, _shots(scan, path, info, tracker, sample_period_s, make_detector(scene_kind, scene_threshold, scene_min_len_frames),
                        scene_width, text_capacity, text_stride)


def _shots(scan: VideoScan, path, info: VideoInfo, tracker: FaceTracker, sample_period_s: float, detector, scene_width: int,
           text_capacity: int, text_stride: int) -> Iterator[Shot]:
    shot = Shot(0, -1, [], FrameReservoir(text_capacity, text_stride))  # the open shot
    last_tc: FrameTimecode | None = None
    t_mark = time.perf_counter()
    try:
        for idx, small_bgr, full_rgb in _decode(path, info, sample_period_s, scene_width, scan.times):
            last_tc = FrameTimecode(idx, fps=info.fps)
            for cut in detector.process_frame(last_tc, small_bgr):
                if shot.start < cut.frame_num < scan.n_frames:
                    done, shot = _cut(shot, cut.frame_num)
                    yield done
            if full_rgb is not None:
                now = time.perf_counter()
                shot.scene_seconds += now - t_mark
                shot.samples.append(tracker.sample(idx, full_rgb))
                shot.reservoir.offer(idx, full_rgb)
                t_mark = time.perf_counter()
                shot.track_seconds += t_mark - now
    except VideoError as err:
        scan.decode_error = err.detail
    if last_tc is not None:
        for cut in detector.post_process(last_tc):
            if shot.start < cut.frame_num < scan.n_frames:
                done, shot = _cut(shot, cut.frame_num)
                yield done
    shot.scene_seconds += time.perf_counter() - t_mark
    if scan.n_frames:
        shot.end = scan.n_frames
        yield shot


def _cut(shot: Shot, cut: int) -> tuple[Shot, Shot]:
    """(the finished shot, the new open one from ``cut``). Detectors confirm a cut a few frames
    late: the samples and candidates of those frames move to the new shot."""
    tail = Shot(cut, -1, [s for s in shot.samples if s.frame >= cut], shot.reservoir.split_off(cut))
    shot.samples = [s for s in shot.samples if s.frame < cut]
    shot.end = cut
    return shot, tail


def _decode(path, info: VideoInfo, sample_period_s: float, width: int, times: list[float]
            ) -> Iterator[tuple[int, np.ndarray, np.ndarray | None]]:
    """(index, small BGR frame for the scene detector, full RGB frame or None); each frame's
    timestamp is appended to ``times``.

    Frames are sampled on a time grid (the first frame at or after each multiple of
    ``sample_period_s``), not every n-th index: the rate holds for variable frame rates and for
    containers that declare a wrong one.

    Planar 4:2:0 frames are shrunk on their planes and converted once for the detector (a fifth
    of FFmpeg's scaler doing both).
    """
    import av  # local: keeps the module importable for docs without FFmpeg

    coded_w, coded_h = info.coded_size
    planar = coded_w % 2 == 0 and coded_h % 2 == 0
    tw = min(width, coded_w) // 2 * 2
    th = max(2, int(round(coded_h * tw / coded_w / 2)) * 2)
    turns = info.quarter_turns
    try:
        with av.open(str(path)) as container:
            stream = container.streams.video[0]
            stream.codec_context.thread_count = 1
            last_t, next_sample = -np.inf, 0.0
            for frame in container.decode(stream):
                t = float(frame.time) if frame.time is not None else (len(times) / info.fps)
                if t <= last_t:  # repeated timestamp: not a new frame for our purposes
                    continue
                last_t = t
                times.append(t - info.start_time_s)
                idx = len(times) - 1
                sampled = times[-1] >= next_sample - 1e-6
                if sampled:
                    next_sample = (np.floor(times[-1] / sample_period_s + 1e-6) + 1) * sample_period_s
                if planar and frame.format.name in ("yuv420p", "yuvj420p") and (frame.width, frame.height) == (coded_w, coded_h):
                    small = small_bgr_from_yuv420(yuv420_planes(frame.reformat(format="yuv420p")), tw, th)
                    # FFmpeg's own conversion: its colour range and chroma siting are what every other
                    # decode in the project uses, so face boxes match theirs
                    full = frame.to_ndarray(format="rgb24") if sampled else None
                else:
                    small = frame.to_ndarray(format="bgr24", width=tw, height=th)
                    full = frame.to_ndarray(format="rgb24") if sampled else None
                yield idx, rotate_image(small, turns), (rotate_image(full, turns) if full is not None else None)
    except av.FFmpegError as err:
        raise VideoError("decode_error", f"{os.path.basename(path)}: {err}") from err


def small_bgr_from_yuv420(planes: Yuv420, tw: int, th: int) -> np.ndarray:
    """Area-shrink each plane of a planar 4:2:0 frame, then convert the small frame to BGR."""
    sizes = ((tw, th), (tw // 2, th // 2), (tw // 2, th // 2))
    small = [area_shrink(plane, size) for plane, size in zip(planes, sizes)]
    packed = np.concatenate([p.reshape(-1) for p in small]).reshape(th * 3 // 2, tw)
    return cv2.cvtColor(packed, cv2.COLOR_YUV2BGR_I420)


def area_shrink(plane: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Area-average ``plane`` down to ``size`` (w, h): first by the largest whole factor k (OpenCV's
    fast path, on the plane cut to a multiple of k: at most k - 1 edge pixels left out), then the
    small remainder. OpenCV's area shrink by a fractional factor is 2-4x slower (960x540 -> 128x72:
    1.6 against 0.4 ms per frame); the scene cuts are the same on every sample and fixture video.
    A whole factor (1920 or 1280 wide -> 128) is the one fast step, as before."""
    k = max(1, min(plane.shape[1] // size[0], plane.shape[0] // size[1]))
    if k > 1:
        h, w = plane.shape[0] // k * k, plane.shape[1] // k * k
        plane = cv2.resize(plane[:h, :w], (w // k, h // k), interpolation=cv2.INTER_AREA)
    return plane if plane.shape[1::-1] == size else cv2.resize(plane, size, interpolation=cv2.INTER_AREA)
