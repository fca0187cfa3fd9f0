"""Build test media from real clips: filter variants and broken files (written by the tests)."""

from __future__ import annotations

import wave
from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np

from cogportrait.io.video import VideoWriter, iter_frames, probe_video

SUBTITLES = ("and that is why we always", "check the subtitles first", "before training any model")


def blur(frame: np.ndarray, i: int) -> np.ndarray:
    return cv2.GaussianBlur(frame, (0, 0), 4.0)


def darken(frame: np.ndarray, i: int) -> np.ndarray:
    return (frame.astype(np.float32) * 0.15).astype(np.uint8)


def subtitle(frame: np.ndarray, i: int) -> np.ndarray:
    out = frame.copy()
    h, w = out.shape[:2]
    text = SUBTITLES[(i // 25) % len(SUBTITLES)]
    scale = w / 640
    (tw, th), _ = cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, scale, 2)
    org = ((w - tw) // 2, int(h * 0.93))
    cv2.putText(out, text, org, cv2.FONT_HERSHEY_SIMPLEX, scale, (0, 0, 0), 6, cv2.LINE_AA)
    cv2.putText(out, text, org, cv2.FONT_HERSHEY_SIMPLEX, scale, (255, 255, 255), 2, cv2.LINE_AA)
    return out


def write_variant(src: Path, dst: Path, transform: Callable[[np.ndarray, int], np.ndarray] | None, freeze: bool = False) -> Path:
    """Re-encode a real clip frame by frame with a transform (or its first frame held: frozen)."""
    info = probe_video(src)
    first = None
    with VideoWriter(dst, fps=int(round(info.fps)), size=info.width, preset="ultrafast", crf=16) as writer:
        for i, (_, rgb) in enumerate(iter_frames(src, info)):
            if first is None:
                first = rgb
            frame = first if freeze else rgb
            writer.write(transform(frame, i) if transform else frame)
    return dst


def write_broken_files(folder: Path, real_clip: Path) -> dict[str, Path]:
    """A truncated mp4, a zero-byte file and a text file named .mp4."""
    folder.mkdir(parents=True, exist_ok=True)
    data = real_clip.read_bytes()
    paths = {
        "truncated": folder / "truncated.mp4",
        "zero_byte": folder / "zero_byte.mp4",
        "text_as_mp4": folder / "notes.mp4",
    }
    paths["truncated"].write_bytes(data[: len(data) // 3])
    paths["zero_byte"].write_bytes(b"")
    paths["text_as_mp4"].write_text("this is not a video, only a text file with an .mp4 name\n" * 20)
    return paths


def truncated_faststart(src: Path, dst: Path, keep: float = 0.5) -> Path:
    """Remux with the index at the front (faststart), then cut the file: it opens, then breaks."""
    import av

    full = dst.with_suffix(".full.mp4")
    with av.open(str(src)) as inp, av.open(str(full), "w", format="mp4", options={"movflags": "faststart"}) as out:
        in_stream = inp.streams.video[0]
        out_stream = out.add_stream_from_template(in_stream)
        for packet in inp.demux(in_stream):
            if packet.dts is None:
                continue
            packet.stream = out_stream
            out.mux(packet)
    data = full.read_bytes()
    dst.write_bytes(data[: int(len(data) * keep)])
    full.unlink()
    return dst


def small_face_variant(src: Path, dst: Path, face_scale: float = 0.25, canvas: tuple[int, int] = (640, 480)) -> Path:
    """The real clip shrunk into a corner of a larger grey frame: a face far below 96 px."""
    info = probe_video(src)
    w, h = canvas
    with VideoWriter(dst, fps=int(round(info.fps)), size=w, preset="ultrafast", crf=16) as writer:
        for _, rgb in iter_frames(src, info):
            small = cv2.resize(rgb, None, fx=face_scale, fy=face_scale, interpolation=cv2.INTER_AREA)
            frame = np.full((w, w, 3), 128, np.uint8)
            frame[40 : 40 + small.shape[0], 40 : 40 + small.shape[1]] = small
            writer.write(frame)
    return dst


def group_photo_pan(image: Path, dst: Path, n_frames: int = 90, size: int = 640) -> Path:
    """A slow pan over a real group photo: several faces of similar size in every frame."""
    img = cv2.cvtColor(cv2.imread(str(image)), cv2.COLOR_BGR2RGB)
    h, w = img.shape[:2]
    side = min(h, w)
    with VideoWriter(dst, fps=25, size=size, preset="ultrafast", crf=16) as writer:
        for i in range(n_frames):
            x0 = int((w - side) * i / max(1, n_frames - 1))
            writer.write(cv2.resize(img[:side, x0 : x0 + side], (size, size), interpolation=cv2.INTER_AREA))
    return dst


def rotated_variant(src: Path, dst: Path, degrees: int = 90) -> Path:
    """A phone-style file: frames stored turned clockwise, display matrix says turn them back.

    The frames are also cut to 4:3 so that swapped width and height are visible in the output.
    """
    import av
    from fractions import Fraction

    info = probe_video(src)
    h = info.height * 3 // 4 // 2 * 2
    top = (info.height - h) // 2
    with av.open(str(dst), "w") as container:
        stream = container.add_stream("libx264", rate=Fraction(int(round(info.fps))))
        stream.width, stream.height = (h, info.width) if degrees % 180 else (info.width, h)
        stream.pix_fmt = "yuv420p"
        stream.options = {"preset": "ultrafast", "crf": "16"}
        stream.set_display_rotation(degrees)
        for i, (_, rgb) in enumerate(iter_frames(src, info)):
            stored = np.ascontiguousarray(np.rot90(rgb[top : top + h], -(degrees // 90)))
            frame = av.VideoFrame.from_ndarray(stored, format="rgb24")
            frame.pts = i
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return dst


def cut_wav(src: Path, dst: Path, seconds: float) -> None:
    """The first ``seconds`` of a WAV file, same format."""
    with wave.open(str(src)) as r:
        params, data = r.getparams(), r.readframes(int(seconds * r.getframerate()))
    with wave.open(str(dst), "wb") as w:
        w.setparams(params)
        w.writeframes(data)
