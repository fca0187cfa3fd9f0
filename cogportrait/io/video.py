"""Video probe, streaming decode and encode on PyAV.

Decoding always streams frame by frame (memory flat in video length). Frame indices are
positions in the decoded stream, derived from timestamps so that a seek lands on the same
numbers as a decode from the start.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import av
import numpy as np

from cogportrait.io.atomic import atomic_path


class VideoError(Exception):
    """A video that cannot be used; ``reason`` is one of schema.REJECT_REASONS."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True)
class VideoInfo:
    fps: float
    width: int
    height: int
    n_frames: int  # from the container (estimated from duration when the container has none)
    duration_s: float
    has_audio: bool
    codec: str
    start_time_s: float  # timestamp of the first frame
    rotation: int = 0  # degrees counter-clockwise to display upright (phone videos); width/height are as displayed

    @property
    def quarter_turns(self) -> int:
        return (self.rotation // 90) % 4

    @property
    def coded_size(self) -> tuple[int, int]:
        """(width, height) of the frames as stored, before the display rotation."""
        return (self.height, self.width) if self.quarter_turns % 2 else (self.width, self.height)


def frame_rotation(frame: av.VideoFrame) -> int:
    """The display rotation of a decoded frame, rounded to a multiple of 90 degrees."""
    angle = getattr(frame, "rotation", 0) or 0
    return int(round(angle / 90.0)) * 90 % 360


def rotate_image(img: np.ndarray, quarter_turns: int) -> np.ndarray:
    return np.ascontiguousarray(np.rot90(img, quarter_turns)) if quarter_turns else img


Yuv420 = tuple[np.ndarray, np.ndarray, np.ndarray]  # the Y, U and V planes of a 4:2:0 frame (U, V at half size)


def yuv420_planes(frame: av.VideoFrame, quarter_turns: int = 0) -> Yuv420:
    """The three planes of a planar 4:2:0 frame as arrays.

    Upright, they are views of the frame's own buffers (no copy: a decoded frame is read where the
    decoder left it, and a frame to encode is painted in place); they keep the frame alive. A
    display rotation gives rotated copies.
    """
    planes = []
    for plane in frame.planes[:3]:
        rows = np.frombuffer(plane, np.uint8)[: plane.line_size * plane.height].reshape(plane.height, plane.line_size)
        view = rows[:, : plane.width]
        planes.append(np.ascontiguousarray(np.rot90(view, quarter_turns)) if quarter_turns else view)
    return planes[0], planes[1], planes[2]


def probe_video(path: str | os.PathLike) -> VideoInfo:
    """Open a file, check it has a decodable video stream, and read its geometry and timing."""
    path = Path(path)
    if not path.exists():
        raise VideoError("missing_file", f"no file at {path}")
    if path.stat().st_size == 0:
        raise VideoError("empty_file", f"{path} has zero bytes")
    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise VideoError("no_video_stream", f"{path.name}: streams are {[s.type for s in container.streams]}")
            stream = container.streams.video[0]
            rate = stream.average_rate or stream.guessed_rate or stream.base_rate
            if not rate or float(rate) <= 0:
                raise VideoError("undecodable", f"{path.name}: no frame rate")
            fps = float(rate)
            first = next(container.decode(stream), None)
            if first is None:
                raise VideoError("undecodable", f"{path.name}: the video stream yields no frame")
            start = float(first.time or 0.0)
            if stream.duration is not None and stream.time_base is not None:
                duration = float(stream.duration * stream.time_base)
            elif container.duration is not None:
                duration = container.duration / av.time_base
            else:
                duration = (stream.frames or 0) / fps
            n_frames = stream.frames or int(round(duration * fps))
            rotation = frame_rotation(first)
            width, height = (first.height, first.width) if (rotation // 90) % 2 else (first.width, first.height)
            return VideoInfo(
                fps=fps,
                width=width,
                height=height,
                n_frames=int(n_frames),
                duration_s=float(duration),
                has_audio=bool(container.streams.audio),
                codec=stream.codec_context.name,
                start_time_s=start,
                rotation=rotation,
            )
    except av.FFmpegError as err:
        raise VideoError("undecodable", f"{path.name}: {err}") from err


def _frame_index(frame: av.VideoFrame, info: VideoInfo, times: np.ndarray | None, offset: int) -> int:
    """Index of a decoded frame: from known frame times when given (exact for VFR), else t * fps.

    ``times`` count from the stream's first frame, as the scan records them: a stream that starts
    late (MPEG-TS from 1.4 s, an edited MP4) has its start subtracted first.
    Returns -1 for a frame before the known times and len(times) + offset for one after them.
    """
    t = (float(frame.time) if frame.time is not None else 0.0) - info.start_time_s
    if times is None or len(times) == 0:
        return int(round(t * info.fps))
    half = 0.5 / info.fps
    if t < times[0] - half:
        return -1
    if t > times[-1] + half:
        return offset + len(times)
    i = int(np.searchsorted(times, t))
    if i == len(times) or (i > 0 and t - times[i - 1] < times[i] - t):
        i -= 1
    return offset + i


def iter_frames(
    path: str | os.PathLike,
    info: VideoInfo,
    start_frame: int = 0,
    end_frame: int | None = None,
    step: int = 1,
    width: int | None = None,
    fmt: str = "rgb24",
    times: np.ndarray | None = None,
    threads: int = 1,
) -> Iterator[tuple[int, np.ndarray | Yuv420]]:
    """Yield (frame index, HxWx3 array) for frames in [start_frame, end_frame), every ``step``-th;
    with ``fmt="yuv420p"`` the frame is its three planes instead (``yuv420_planes``: no copy).

    ``times`` are the decoded timestamps of frames start_frame, start_frame + 1, ... (from a
    full pass, see the scan step); with them indices are exact for variable frame rates.
    Seeks near ``start_frame`` first; ``width`` rescales inside FFmpeg (cheap) keeping aspect.
    Only selected frames are converted to arrays, upright (a display rotation is applied). One
    decoder thread by default: a pipeline runs one worker per core, and threads only add
    overhead there. Raises VideoError('decode_error') when the stream breaks part-way.
    """
    turns = info.quarter_turns
    height = None
    if width is not None and width < info.width:
        height = max(2, int(round(info.height * width / info.width / 2)) * 2)
        if turns % 2:  # scale in the coded orientation, then rotate
            width, height = height, width
    else:
        width = None
    last = -1
    try:
        with av.open(str(path)) as container:
            stream = container.streams.video[0]
            stream.codec_context.thread_count = threads
            if start_frame > 0:
                t_start = float(times[0]) if times is not None and len(times) else start_frame / info.fps
                target = info.start_time_s + max(0.0, t_start - 1.0 / info.fps)
                container.seek(int(target / stream.time_base), stream=stream, backward=True, any_frame=False)
            for frame in container.decode(stream):
                idx = _frame_index(frame, info, times, start_frame)
                if idx <= last:  # duplicate timestamps (rare VFR muxing): keep the first
                    continue
                last = idx
                if idx < start_frame:
                    continue
                if end_frame is not None and idx >= end_frame:
                    break
                if (idx - start_frame) % step:
                    continue
                if fmt == "yuv420p":  # the planes as decoded when they are yuv420p already (no copy)
                    yield idx, yuv420_planes(frame.reformat(format="yuv420p", width=width, height=height), turns)
                    continue
                if width is not None:
                    img = frame.to_ndarray(format=fmt, width=width, height=height)
                else:
                    img = frame.to_ndarray(format=fmt)
                yield idx, rotate_image(img, turns)
    except av.FFmpegError as err:
        if end_frame is not None and last >= end_frame - 1:
            return  # the stream breaks only after the requested span: not this span's problem
        raise VideoError("decode_error", f"{Path(path).name}: {err}") from err


def read_frames_at(path: str | os.PathLike, info: VideoInfo, indices: list[int]) -> dict[int, np.ndarray]:
    """Decode a few frames by index (one seek each); missing indices are left out."""
    out: dict[int, np.ndarray] = {}
    for idx in sorted(set(indices)):
        for got, img in iter_frames(path, info, start_frame=idx, end_frame=idx + 1):
            out[got] = img
    return out


class VideoWriter:
    """H.264 writer for RGB frames at a fixed rate, made visible atomically on close.

    With ``audio_rate`` the file also gets an AAC track (``audio_channels`` 1 or 2) that
    ``write_audio`` fills; the stream has to be declared before the first frame is muxed.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        fps: int,
        size: int,
        preset: str = "ultrafast",
        crf: int = 18,
        threads: int = 1,
        audio_rate: int | None = None,
        audio_channels: int = 1,
    ) -> None:
        self._ctx = atomic_path(path, ".mp4")
        tmp = self._ctx.__enter__()
        self._container = av.open(str(tmp), mode="w", format="mp4")
        self._stream = self._container.add_stream("libx264", rate=Fraction(fps))
        self.size = size
        self._stream.width = size
        self._stream.height = size
        self._stream.pix_fmt = "yuv420p"
        self._stream.options = {"preset": preset, "crf": str(crf), "threads": str(threads)}
        self.n_frames = 0
        self._audio = None
        self._audio_pts = 0
        self._audio_buf: np.ndarray | None = None
        if audio_rate is not None:
            if audio_channels not in (1, 2):
                raise ValueError(f"audio_channels must be 1 or 2, got {audio_channels}")
            layout = "mono" if audio_channels == 1 else "stereo"
            self._audio = self._container.add_stream("aac", rate=int(audio_rate), layout=layout)

    def write(self, rgb: np.ndarray) -> None:
        self._encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(rgb), format="rgb24"))

    def write_yuv420(self, paint: Callable[[Yuv420], None]) -> None:
        """A planar 4:2:0 frame that ``paint`` draws into the three planes it is handed (Y at
        size², U and V at half that): no RGB->YUV conversion and no copy."""
        frame = av.VideoFrame(self.size, self.size, "yuv420p")
        paint(yuv420_planes(frame))
        self._encode(frame)

    def _encode(self, frame: av.VideoFrame) -> None:
        frame.pts = self.n_frames
        for packet in self._stream.encode(frame):
            self._container.mux(packet)
        self.n_frames += 1

    def write_audio(self, samples: np.ndarray) -> None:
        """Append float samples in [-1, 1], shaped (channels, n), to the AAC track.

        Encoded in whole encoder frames (1024 samples); the remainder waits for the next call or
        for ``close``. The muxer interleaves, so audio may come after all the frames.
        """
        if self._audio is None:
            raise RuntimeError("this VideoWriter was opened without audio_rate")
        x = np.asarray(samples, dtype=np.float32).reshape(len(self._audio.layout.channels), -1)
        self._audio_buf = np.concatenate([self._audio_buf, x], axis=1) if self._audio_buf is not None else x
        step = self._audio.codec_context.frame_size or 1024
        while self._audio_buf.shape[1] >= step:
            self._encode_audio(self._audio_buf[:, :step])
            self._audio_buf = self._audio_buf[:, step:]

    def _encode_audio(self, chunk: np.ndarray | None) -> None:
        """Encode one frame of samples (``None`` flushes the encoder)."""
        frame = None
        if chunk is not None:
            layout = self._audio.layout.name
            frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(chunk), format="fltp", layout=layout)
            frame.sample_rate = rate = self._audio.codec_context.sample_rate
            frame.time_base = Fraction(1, rate)
            frame.pts = self._audio_pts
            self._audio_pts += frame.samples
        for packet in self._audio.encode(frame):
            self._container.mux(packet)

    def close(self, ok: bool = True) -> None:
        try:
            for packet in self._stream.encode():
                self._container.mux(packet)
            if self._audio is not None:
                if self._audio_buf is not None and self._audio_buf.shape[1]:
                    self._encode_audio(self._audio_buf)  # AAC takes a shorter last frame
                self._encode_audio(None)
        finally:
            self._container.close()
            if ok:
                self._ctx.__exit__(None, None, None)
            else:
                self._ctx.__exit__(RuntimeError, RuntimeError("aborted"), None)

    def __enter__(self) -> VideoWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close(ok=exc_type is None)


def resample_times(start_s: float, end_s: float, fps: int) -> np.ndarray:
    """Output frame times for a span at a fixed rate (the span's length rounded to frames)."""
    n = max(0, int(math.floor((end_s - start_s) * fps + 1e-6)))
    return start_s + np.arange(n) / fps
