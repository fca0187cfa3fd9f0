"""Audio: cut a span of a container's first audio stream to 16 kHz mono 16-bit WAV."""

from __future__ import annotations

import os
import wave
from pathlib import Path

import av
import numpy as np

from cogportrait.io.atomic import atomic_path
from cogportrait.io.video import VideoError


def extract_audio_span(
    path: str | os.PathLike, start_s: float, end_s: float, out_wav: str | os.PathLike, sample_rate: int = 16_000
) -> bool:
    """Write [start_s, end_s) of the audio as mono WAV; returns False when there is no audio stream.

    Times are on the container's timeline (the streams' timestamps), not from the first video frame.

    The output always holds exactly round((end_s - start_s) * sample_rate) samples (silence pads
    a track that ends early), so audio and the 25 fps video stay aligned sample for sample.
    """
    n_out = int(round((end_s - start_s) * sample_rate))
    chunks: list[np.ndarray] = []
    try:
        with av.open(str(path)) as container:
            if not container.streams.audio:
                return False
            stream = container.streams.audio[0]
            resampler = av.AudioResampler(format="s16", layout="mono", rate=sample_rate)
            if start_s > 0.5:
                container.seek(int((start_s - 0.5) / av.time_base), backward=True)
            got_start: float | None = None
            for frame in container.decode(stream):
                t0 = float(frame.time) if frame.time is not None else 0.0
                if t0 > end_s:
                    break
                for out in resampler.resample(frame):
                    if got_start is None:
                        got_start = float(out.time) if out.time is not None else t0
                    chunks.append(out.to_ndarray().reshape(-1))
            for out in resampler.resample(None):
                chunks.append(out.to_ndarray().reshape(-1))
    except av.FFmpegError as err:
        raise VideoError("decode_error", f"{Path(path).name} audio: {err}") from err
    samples = np.concatenate(chunks) if chunks else np.zeros(0, np.int16)
    offset = int(round((start_s - (got_start if got_start is not None else start_s)) * sample_rate))
    if offset >= 0:
        samples = samples[offset:]
    else:
        samples = np.concatenate([np.zeros(-offset, np.int16), samples])
    if len(samples) < n_out:
        samples = np.concatenate([samples, np.zeros(n_out - len(samples), np.int16)])
    samples = samples[:n_out].astype("<i2")
    with atomic_path(out_wav, ".wav") as tmp:
        with wave.open(str(tmp), "wb") as wav:
            wav.setnchannels(1)
            wav.setsampwidth(2)
            wav.setframerate(sample_rate)
            wav.writeframes(samples.tobytes())
    return True


def read_wav(path: str | os.PathLike) -> tuple[np.ndarray, int, int]:
    """Return (int16 samples, sample rate, channels) of a PCM WAV file."""
    with wave.open(str(path), "rb") as wav:
        data = np.frombuffer(wav.readframes(wav.getnframes()), dtype="<i2")
        return data, wav.getframerate(), wav.getnchannels()
