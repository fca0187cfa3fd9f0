"""Build test media from real clips: filter variants and broken files (written by the tests)."""

from __future__ import annotations

import functools
import wave
from collections.abc import Callable
from dataclasses import dataclass
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


def late_start_variant(src: Path, dst: Path, delay_s: float = 1.0) -> Path:
    """The same packets (no re-encode) in MPEG-TS with every timestamp ``delay_s`` later: a
    stream that starts late, as broadcasts and files cut without re-encoding do."""
    import av

    with av.open(str(src)) as inp, av.open(str(dst), "w", format="mpegts") as out:
        sources = [*inp.streams.video[:1], *inp.streams.audio[:1]]
        copies = {s.index: out.add_stream_from_template(s) for s in sources}
        for packet in inp.demux(*sources):
            if packet.dts is None:  # the demuxer's end-of-stream marker
                continue
            shift = int(round(delay_s / packet.time_base))
            packet.pts, packet.dts = packet.pts + shift, packet.dts + shift
            packet.stream = copies[packet.stream.index]
            out.mux(packet)
    return dst


def cut_wav(src: Path, dst: Path, seconds: float) -> None:
    """The first ``seconds`` of a WAV file, same format."""
    with wave.open(str(src)) as r:
        params, data = r.getparams(), r.readframes(int(seconds * r.getframerate()))
    with wave.open(str(dst), "wb") as w:
        w.setparams(params)
        w.writeframes(data)


# ---------------------------------------------------------------------------------------------
# Text variants for the caption filter: overlays burnt in after the camera (captions, tickers,
# logos, name tags) and text in the scene (signs, badges) that moves with the picture.
# A transform maps (RGB frame, frame index) -> RGB frame; ``compose`` chains them in order, so
# scene text drawn before ``shake`` moves with the picture and overlays drawn after it do not.
# ---------------------------------------------------------------------------------------------
Transform = Callable[[np.ndarray, int], np.ndarray]
FONT = cv2.FONT_HERSHEY_SIMPLEX
CAPTION_LINES = (
    "and that is why we always", "check the subtitles first", "before training any model",
    "so let me show you how it works", "on real footage from the street",
)
SHORT_CAPTION_LINES = ("and that is why", "we always check", "the subtitles", "before training", "any model")  # large type
TICKER_TEXT = "MARKETS CLOSE HIGHER  +++  STORM WARNING FOR THE COAST  +++  TRAFFIC DELAYS ON ROUTE 9  +++  "


def font_scale(cap_px: float, thickness: int) -> float:
    """The cv2 font scale whose capital letters are ``cap_px`` pixels tall."""
    (_, h), _ = cv2.getTextSize("H", FONT, 1.0, thickness)
    return cap_px / h


def draw_text(
    out: np.ndarray, text: str, org: tuple[int, int], cap_px: float,
    colour: tuple[int, int, int] = (255, 255, 255), outline: tuple[int, int, int] | None = (0, 0, 0),
) -> tuple[int, int]:
    """Text with its baseline-left corner at ``org`` (in place); returns its (width, height) px."""
    thick = max(1, round(cap_px / 9))
    scale = font_scale(cap_px, thick)
    if outline is not None:
        cv2.putText(out, text, org, FONT, scale, outline, thick + max(2, thick), cv2.LINE_AA)
    cv2.putText(out, text, org, FONT, scale, colour, thick, cv2.LINE_AA)
    (w, h), _ = cv2.getTextSize(text, FONT, scale, thick)
    return w, h


def text_width(text: str, cap_px: float) -> int:
    thick = max(1, round(cap_px / 9))
    return cv2.getTextSize(text, FONT, font_scale(cap_px, thick), thick)[0][0]


def compose(*transforms: Transform) -> Transform:
    def apply(frame: np.ndarray, i: int) -> np.ndarray:
        for t in transforms:
            frame = t(frame, i)
        return frame

    return apply


def captions(cap: float = 0.025, y: float = 0.9, period: int = 50, gap: int = 0, lines: tuple[str, ...] = CAPTION_LINES) -> Transform:
    """Subtitles that change every ``period`` frames (line ``i // period`` of ``lines``), centred,
    capitals ``cap`` of the frame height tall, baseline at ``y`` of the height; blank for the
    last ``gap`` frames of each period (the pause between two subtitles)."""

    def apply(frame: np.ndarray, i: int) -> np.ndarray:
        if i % period >= period - gap:
            return frame
        out = frame.copy()
        h, w = out.shape[:2]
        text = lines[(i // period) % len(lines)]
        px = cap * h
        draw_text(out, text, ((w - text_width(text, px)) // 2, int(y * h)), px)
        return out

    return apply


def ticker(cap: float = 0.035, y: float = 0.94, speed: float = 0.012, text: str = TICKER_TEXT) -> Transform:
    """A news ticker: a dark bar across the width with text scrolling left ``speed`` of the
    width per frame."""

    def apply(frame: np.ndarray, i: int) -> np.ndarray:
        out = frame.copy()
        h, w = out.shape[:2]
        px = cap * h
        base = int(y * h)
        out[int(base - 1.8 * px) : min(h, int(base + 0.8 * px))] = (20, 30, 90)
        period = text_width(text, px)
        x = -int(i * speed * w) % period
        for start in (x - period, x, x + period):
            if start < w and start + period > 0:
                draw_text(out, text, (start, base), px, outline=None)
        return out

    return apply


def corner_logo(text: str = "CP24 NEWS", cap: float = 0.035, corner: str = "top_right") -> Transform:
    """A broadcaster's bug: fixed text in a corner, the same in every frame."""

    def apply(frame: np.ndarray, i: int) -> np.ndarray:
        out = frame.copy()
        h, w = out.shape[:2]
        px, margin = cap * h, int(0.04 * w)
        x = w - margin - text_width(text, px) if corner.endswith("right") else margin
        y = int(margin + px) if corner.startswith("top") else h - margin
        draw_text(out, text, (x, y), px)
        return out

    return apply


def name_tag(name: str = "Dr. Jane Doe", title: str = "Neuroscientist, City University", cap: float = 0.04) -> Transform:
    """A static lower third: a dark plate at the bottom left with a name and a title."""

    def apply(frame: np.ndarray, i: int) -> np.ndarray:
        out = frame.copy()
        h, w = out.shape[:2]
        px = cap * h
        x0, y0 = int(0.05 * w), int(0.76 * h)
        width = max(text_width(name, px), text_width(title, 0.6 * px)) + int(0.04 * w)
        plate = out[y0 : int(y0 + 3.2 * px), x0 : x0 + width]
        plate[:] = (0.35 * plate + 0.65 * np.array([15, 25, 60])).astype(np.uint8)
        draw_text(out, name, (x0 + int(0.02 * w), int(y0 + 1.4 * px)), px, outline=None)
        draw_text(out, title, (x0 + int(0.02 * w), int(y0 + 2.6 * px)), 0.6 * px, colour=(220, 220, 220), outline=None)
        return out

    return apply


def sign(text: str = "BAKERY  OPEN DAILY", at: tuple[float, float] = (0.03, 0.04), cap: float = 0.035,
         plate: tuple[int, int, int] = (225, 205, 160), ink: tuple[int, int, int] = (60, 30, 20)) -> Transform:
    """A sign in the scene: a plate with dark lettering at ``at`` (x, y shares of the frame,
    top-left corner of the plate). Draw it before ``shake`` so that it moves with the picture."""

    def apply(frame: np.ndarray, i: int) -> np.ndarray:
        out = frame.copy()
        h, w = out.shape[:2]
        px = cap * h
        x0, y0 = int(at[0] * w), int(at[1] * h)
        x1, y1 = x0 + text_width(text, px) + int(1.2 * px), int(y0 + 2.0 * px)
        cv2.rectangle(out, (x0, y0), (x1, y1), plate, -1)
        cv2.rectangle(out, (x0, y0), (x1, y1), ink, max(1, round(px / 8)))
        draw_text(out, text, (x0 + int(0.6 * px), int(y0 + 1.5 * px)), px, colour=ink, outline=None)
        return out

    return apply


def shelf_badges(labels: tuple[str, ...] = ("AWARD 2021", "ISO 9001", "BEST TEAM"), y: float = 0.1, cap: float = 0.022) -> Transform:
    """Badges standing on a shelf behind the speaker: a brown shelf edge across the frame with
    small labelled plaques at the left and right (clear of a centred face)."""

    def apply(frame: np.ndarray, i: int) -> np.ndarray:
        out = frame.copy()
        h, w = out.shape[:2]
        px = cap * h
        base = int(y * h)
        out[base : base + max(2, int(0.012 * h))] = (90, 60, 35)
        xs = [int(0.02 * w), int(0.8 * w - text_width(labels[1], px)), int(0.98 * w - text_width(labels[2], px))]
        for x, label in zip(xs, labels):
            x1 = x + text_width(label, px) + int(0.6 * px)
            cv2.rectangle(out, (x, int(base - 2.0 * px)), (x1, base), (200, 170, 60), -1)
            draw_text(out, label, (x + int(0.3 * px), int(base - 0.5 * px)), px, colour=(40, 30, 10), outline=None)
        return out

    return apply


def book_shelf(labels: tuple[str, ...] = ("HISTORY", "SCIENCE", "ART BOOKS", "MUSIC", "TRAVEL", "POETRY"),
               y: float = 0.17, cap: float = 0.024) -> Transform:
    """A shelf across the whole width at head height with labelled boxes standing on it."""

    def apply(frame: np.ndarray, i: int) -> np.ndarray:
        out = frame.copy()
        h, w = out.shape[:2]
        px, base = cap * h, int(y * h)
        out[base : base + max(2, int(0.012 * h))] = (90, 60, 35)
        x = int(0.01 * w)
        for k, label in enumerate(labels):
            x1 = x + text_width(label, px) + int(0.6 * px)
            cv2.rectangle(out, (x, int(base - 2.0 * px)), (x1, base), ((200, 170, 60), (170, 200, 210), (220, 220, 200))[k % 3], -1)
            draw_text(out, label, (x + int(0.3 * px), int(base - 0.5 * px)), px, colour=(40, 30, 10), outline=None)
            x = x1 + int(0.8 * px)
        return out

    return apply


@functools.cache
def _face_tracker():
    from cogportrait.config import CurateConfig
    from cogportrait.curate.tracking import FaceTracker

    cfg = CurateConfig()
    return FaceTracker(cfg.face_min_confidence, cfg.min_face_px, cfg.multi_face_area_ratio)


def behind_head(draw: Transform) -> Transform:
    """Scene text behind the speaker: drawn, then the head put back in front of it (an ellipse
    over MediaPipe's face box and the hair above it), so the head hides a part that moves as
    the head does."""

    def apply(frame: np.ndarray, i: int) -> np.ndarray:
        out = draw(frame, i)
        faces = _face_tracker().detect(frame)
        if not faces:
            return out
        x0, y0, x1, y1, _ = max(faces, key=lambda f: (f[2] - f[0]) * (f[3] - f[1]))
        fw, fh = x1 - x0, y1 - y0
        mask = np.zeros(frame.shape[:2], np.uint8)
        cv2.ellipse(mask, (int((x0 + x1) / 2), int(y0 + 0.3 * fh)), (int(0.75 * fw), int(0.85 * fh)), 0, 0, 360, 255, -1)
        out[mask > 0] = frame[mask > 0]
        return out

    return apply


def shake(amplitude: float = 0.03, seed: int = 0) -> Transform:
    """Hand-held camera: the picture translated by a smooth pseudo-random offset of up to
    ``amplitude`` of the frame size (edges replicated)."""
    rng = np.random.default_rng(seed)
    freqs, phases = rng.uniform(0.03, 0.12, (2, 3)), rng.uniform(0, 2 * np.pi, (2, 3))

    def apply(frame: np.ndarray, i: int) -> np.ndarray:
        h, w = frame.shape[:2]
        dx, dy = (np.sin(freqs * i + phases).sum(1) / 3 * amplitude) * (w, h)
        m = np.float32([[1, 0, dx], [0, 1, dy]])
        return cv2.warpAffine(frame, m, (w, h), borderMode=cv2.BORDER_REPLICATE)

    return apply


def spread_frames(src: Path, count: int, transform: Transform | None = None) -> dict[int, np.ndarray]:
    """``count`` frames spread evenly over a clip (as the scan spreads a span's text
    frames), each through ``transform`` with its frame index: a variant's sampled frames
    without encoding the whole variant."""
    from cogportrait.io.video import read_frames_at

    info = probe_video(src)
    wanted = sorted({int((k + 0.5) * info.n_frames / count) for k in range(count)})
    frames = read_frames_at(src, info, wanted)
    return {i: transform(rgb, i) if transform else rgb for i, rgb in frames.items()}


@dataclass(frozen=True)
class TextVariant:
    """A real clip with text burnt in (or none), and what the text filter should say."""

    name: str
    source: str  # file name in datasets/sample/videos
    transform: Transform | None
    kind: str  # expected text_kind
    caption: bool  # ground truth: captions or a ticker, to be rejected as text_overlay


def _text_variants() -> list[TextVariant]:
    out = []
    for src in ("lp_d10_woman_browraise_wink_audio.mp4", "lp_d20_man_talking_outdoor_audio.mp4", "tpsmm_driving_man_talking.mp4"):
        tag = src.split("_")[0] + "_" + src.split("_")[1]
        cases = [
            ("clean", None, "none", False),
            ("captions_small", captions(cap=0.022), "caption", True),
            ("captions_large", captions(cap=0.05, y=0.87, period=60, lines=SHORT_CAPTION_LINES), "caption", True),
            ("captions_pauses", captions(cap=0.03, y=0.92, period=50, gap=12), "caption", True),
            ("captions_top", captions(cap=0.03, y=0.1), "caption", True),
            ("captions_shaky_camera", compose(shake(0.03), captions(cap=0.025)), "caption", True),
            ("ticker", ticker(), "ticker", True),
            ("corner_logo", corner_logo(), "static", False),
            ("name_tag", name_tag(), "static", False),
            ("sign_still", sign(), "static", False),
            ("sign_shaky_camera", compose(sign(), shake(0.03)), "scene", False),
            ("big_sign_shaky_camera", compose(sign("GRAND HOTEL", at=(0.08, 0.02), cap=0.065), shake(0.03, seed=1)), "scene", False),
            ("shelf_badges", shelf_badges(), "static", False),
            ("book_shelf_behind_head", behind_head(book_shelf()), "static", False),
        ]
        out += [TextVariant(f"{tag}_{name}", src, t, kind, cap) for name, t, kind, cap in cases]
    # the curate job's own subtitled variant (tests/test_curate.py) on its 3 s clip
    out.append(TextVariant("lp_d0_subtitle", "lp_d0_man_greenscreen_gaze_blink.mp4", subtitle, "caption", True))
    return out


TEXT_VARIANTS: tuple[TextVariant, ...] = tuple(_text_variants())


def build_tiny_arcface(folder: Path) -> Path:
    """An insightface-shaped recognition model: 1x3x112x112 in, 512 out (random, seeded)."""
    import torch

    torch.set_num_threads(1)
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 5, stride=4), torch.nn.ReLU(), torch.nn.Conv2d(8, 16, 3, stride=2),
                              torch.nn.ReLU(), torch.nn.AvgPool2d(13), torch.nn.Flatten(), torch.nn.Linear(16, 512))
    folder.mkdir(parents=True, exist_ok=True)
    torch.onnx.export(net, (torch.zeros(1, 3, 112, 112),), str(folder / "w600k_r50.onnx"), dynamo=False,
                      input_names=["input.1"], output_names=["embedding"], dynamic_axes={"input.1": {0: "batch"}})
    return folder
