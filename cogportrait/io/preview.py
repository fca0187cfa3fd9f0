"""Preview videos: keypoints drawn on the reference portrait (or a blank canvas), H.264 with optional AAC.

``write_preview`` is what ``cogportrait compile`` writes as ``preview.mp4``; ``write_video`` takes any
stream of frames (Stage 2's pose videos). Both encode through ``io.video.VideoWriter``, so there is
one encoder setup in the project, and appear atomically. The audio, when given, is decoded with
PyAV (a WAV at any rate and sample width, or anything FFmpeg reads), resampled only when AAC cannot
carry its rate, and cut or padded with silence to the video's exact duration, so that speech and
keypoints stay aligned from the first frame and the players show no tail of sound after the end.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from pathlib import Path

import av
import numpy as np

from cogportrait.face.render import blank_canvas, draw_keypoints
from cogportrait.io.video import VideoWriter
from cogportrait.schema import CLIP_FPS, N_KEYPOINTS

# Sampling rates the MPEG-4 AAC header can signal; anything else is resampled to 48 kHz.
AAC_RATES: tuple[int, ...] = (8000, 11025, 12000, 16000, 22050, 24000, 32000, 44100, 48000, 64000, 88200, 96000)
FALLBACK_AUDIO_RATE = 48_000


class PreviewInputError(ValueError):
    """Frames, keypoints, a reference image or an audio file the preview cannot use."""


def decode_audio(path: str | os.PathLike, rate: int | None = None, mono: bool = False) -> tuple[np.ndarray, int]:
    """Return (float32 samples in [-1, 1] shaped (channels, n), rate) of a file's first audio stream.

    Mono stays mono; two or more channels become stereo (AAC here carries 1 or 2), or are mixed to
    mono with ``mono``. ``rate`` resamples (an audio encoder's input rate); by default the source
    rate is kept when AAC can carry it.
    """
    path = Path(path)
    if not path.is_file():
        raise PreviewInputError(f"no audio file at {path}")
    chunks: list[np.ndarray] = []
    try:
        with av.open(str(path)) as container:
            if not container.streams.audio:
                raise PreviewInputError(f"{path.name} has no audio stream")
            stream = container.streams.audio[0]
            src_rate = stream.codec_context.sample_rate
            rate = rate or (src_rate if src_rate in AAC_RATES else FALLBACK_AUDIO_RATE)
            layout = "mono" if mono or stream.codec_context.channels == 1 else "stereo"
            resampler = av.AudioResampler(format="fltp", layout=layout, rate=rate)
            for frame in container.decode(stream):
                chunks.extend(out.to_ndarray() for out in resampler.resample(frame))
            chunks.extend(out.to_ndarray() for out in resampler.resample(None))
    except av.FFmpegError as err:
        raise PreviewInputError(f"{path.name}: cannot decode the audio ({err})") from err
    n_channels = 1 if layout == "mono" else 2
    samples = np.concatenate(chunks, axis=1) if chunks else np.zeros((n_channels, 0), np.float32)
    return samples.astype(np.float32, copy=False), rate


def fit_length(samples: np.ndarray, n: int) -> np.ndarray:
    """Cut (channels, m) samples to n, or pad them with silence to n."""
    if samples.shape[1] >= n:
        return samples[:, :n]
    return np.concatenate([samples, np.zeros((samples.shape[0], n - samples.shape[1]), samples.dtype)], axis=1)


def write_video(
    path: str | os.PathLike,
    frames: Iterable[np.ndarray],
    *,
    size: int,
    fps: int = CLIP_FPS,
    audio_path: str | os.PathLike | None = None,
) -> int:
    """Encode ``size`` x ``size`` RGB uint8 frames to an H.264 mp4 at ``fps``; returns the frame count.

    With ``audio_path`` the file gets an AAC track of exactly n_frames / fps seconds. The audio is
    decoded before the first frame is encoded, so a bad file fails fast and leaves nothing behind.
    """
    if size <= 0 or size % 2:
        raise PreviewInputError(f"video size must be a positive even number (4:2:0 chroma), got {size}")
    audio, rate = decode_audio(audio_path) if audio_path is not None else (None, None)
    channels = audio.shape[0] if audio is not None else 1
    with VideoWriter(path, fps, size, audio_rate=rate, audio_channels=channels) as writer:
        for frame in frames:
            if frame.shape != (size, size, 3) or frame.dtype != np.uint8:
                raise PreviewInputError(f"frame {writer.n_frames}: expected ({size}, {size}, 3) uint8, got "
                                        f"{frame.shape} {frame.dtype}")
            writer.write(frame)
        if writer.n_frames == 0:
            raise PreviewInputError("no frames to write")
        if audio is not None:
            writer.write_audio(fit_length(audio, int(round(writer.n_frames * rate / fps))))
        return writer.n_frames


def preview_frames(keypoints: np.ndarray, reference: np.ndarray | None, size: int) -> Iterator[np.ndarray]:
    """One frame per row of ``keypoints`` (T x 62 x 2|3, [0, 1] of the image): the reference
    resized to ``size`` x ``size`` (or a blank canvas) with that frame's keypoints drawn."""
    import cv2

    kp = np.asarray(keypoints)
    if kp.ndim != 3 or kp.shape[1] != N_KEYPOINTS or kp.shape[2] not in (2, 3):
        raise PreviewInputError(f"keypoints must be (T, {N_KEYPOINTS}, 2|3), got {kp.shape}")
    if reference is None:
        base = blank_canvas(size)
    else:
        ref = np.asarray(reference)
        if ref.ndim != 3 or ref.shape[2] != 3 or ref.dtype != np.uint8:
            raise PreviewInputError(f"reference must be an H x W x 3 uint8 RGB image, got {ref.shape} {ref.dtype}")
        shrink = min(ref.shape[:2]) > size
        base = cv2.resize(ref, (size, size), interpolation=cv2.INTER_AREA if shrink else cv2.INTER_LINEAR)
    for frame_keypoints in kp:
        yield draw_keypoints(base, frame_keypoints)


def write_preview(
    path: str | os.PathLike,
    keypoints: np.ndarray,
    reference: np.ndarray | None = None,
    *,
    size: int,
    fps: int = CLIP_FPS,
    audio_path: str | os.PathLike | None = None,
) -> Path:
    """Write ``preview.mp4``: the keypoints drawn frame by frame on the reference portrait (or a
    blank canvas when there is none), with the audio muxed when given."""
    if len(keypoints) == 0:
        raise PreviewInputError("no keypoint frames to preview")
    write_video(path, preview_frames(keypoints, reference, size), size=size, fps=fps, audio_path=audio_path)
    return Path(path)
