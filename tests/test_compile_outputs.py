"""The artefacts `cogportrait compile` writes besides JSON/Parquet: channels.png, preview.mp4,
blendshapes.csv (issue 8 "The command"), and the keypoint drawing they share with Stage 2."""

from __future__ import annotations

import csv
import math
import wave
from pathlib import Path
from types import SimpleNamespace

import av
import numpy as np
import pytest

from cogportrait.behavior.plot import PlotInputError, plot_channels
from cogportrait.face.arkit import (
    AU41_BLINK_FACTOR,
    ARKIT_INDEX,
    ARKIT_NAMES,
    arkit_blendshapes,
    live_link_timecode,
    write_live_link_csv,
)
from cogportrait.face.proxies import BS, au_proxies, gaze_proxies
from cogportrait.face.render import LEFT_COLOUR, RIGHT_COLOUR, blank_canvas, draw_keypoints
from cogportrait.io.preview import PreviewInputError, write_preview, write_video
from cogportrait.schema import BLENDSHAPE_NAMES, CHANNEL_INDEX, KEYPOINT_GROUPS, N_CHANNELS, keypoint_slice

SAMPLE_WAV = Path(__file__).resolve().parents[1] / "datasets" / "sample" / "audio" / "nemo_audio_5s_16k_mono.wav"
C = CHANNEL_INDEX


def _decode_png(path: Path) -> np.ndarray:
    import cv2

    img = cv2.imread(str(path), cv2.IMREAD_COLOR)
    assert img is not None, f"{path} does not decode"
    return img


# ---------------------------------------------------------------------------------------------
# channels.png and the prototype picture (one panel drawing)
# ---------------------------------------------------------------------------------------------
def test_plot_channels_png(tmp_path):
    T = 100
    controls = np.zeros((T, N_CHANNELS))
    controls[:, C["AU1"]] = np.linspace(0, 1, T)
    controls[30:35, C["AU45L"]] = controls[30:35, C["AU45R"]] = 0.9
    controls[:, C["yaw"]] = np.linspace(-10, 10, T)
    spans = [(0, 40, "gaze shifts left with a mild squint"), (40, 41, "a very short event"), (41, 100, "blink")]
    out = plot_channels(controls, spans, tmp_path / "channels.png", "cognitive effort (seed 0)")
    assert out == tmp_path / "channels.png"
    assert _decode_png(out).shape == (990, 1100, 3)  # figsize 10 x 9 in at 110 dpi
    assert [p.name for p in tmp_path.iterdir()] == ["channels.png"]  # no temporary left behind

    with pytest.raises(PlotInputError, match=r"span 0 \[90, 120\)"):
        plot_channels(controls, [(90, 120, "past the end")], tmp_path / "bad.png", "x")
    with pytest.raises(PlotInputError, match="controls must be"):
        plot_channels(controls[:, :16], spans, tmp_path / "bad.png", "x")
    assert not (tmp_path / "bad.png").exists()


def test_plot_prototype_uses_the_shared_panels(tmp_path):
    from prototype_store.plot import PANELS as store_panels
    from prototype_store.plot import plot_prototype

    from cogportrait.behavior.plot import PANELS

    assert store_panels is PANELS
    T = 12
    match = SimpleNamespace(
        controls=np.random.default_rng(0).uniform(0, 1, (T, N_CHANNELS)), start_frame=5, end_frame=5 + T,
        prototype_id="0123456789abcdef", event_type="blink", label="sample", clip_id="c" * 36, identity="a",
        quality_flags=["face_gaps"],
    )
    out = plot_prototype(match, tmp_path / "p.png")
    assert _decode_png(out).shape == (990, 1100, 3)


# ---------------------------------------------------------------------------------------------
# draw_keypoints
# ---------------------------------------------------------------------------------------------
def _synthetic_keypoints() -> np.ndarray:
    """Two eyes, brows and irises laid out like a frontal face in [0, 1]; z = 0."""
    kp = np.zeros((62, 3))
    for side, cx in (("left", 0.68), ("right", 0.32)):  # the subject's left is on the image right
        a = np.linspace(0, 2 * np.pi, 16, endpoint=False)
        kp[keypoint_slice(f"{side}_eye"), :2] = np.stack([cx + 0.08 * np.cos(a), 0.45 + 0.03 * np.sin(a)], 1)
        xs = np.linspace(cx - 0.09, cx + 0.09, 5)
        kp[keypoint_slice(f"{side}_brow"), :2] = np.concatenate(
            [np.stack([xs, np.full(5, 0.34)], 1), np.stack([xs, np.full(5, 0.31)], 1)]
        )
        b = np.array([0.0, np.pi / 2, np.pi, 3 * np.pi / 2])
        iris = np.stack([cx + 0.02 * np.cos(b), 0.45 + 0.02 * np.sin(b)], 1)
        kp[keypoint_slice(f"{side}_iris"), :2] = np.concatenate([[[cx, 0.45]], iris])
    return kp


def test_draw_keypoints_changes_pixels_near_the_keypoints_only():
    size = 256
    canvas = blank_canvas(size)
    assert canvas.shape == (size, size, 3) and canvas.dtype == np.uint8
    assert len(np.unique(canvas.reshape(-1, 3), axis=0)) == 1
    kp = _synthetic_keypoints()
    out = draw_keypoints(canvas, kp)
    assert out is not canvas and (canvas == blank_canvas(size)).all()  # the input is not drawn on
    changed = (out != canvas).any(axis=2)
    ys, xs = np.nonzero(changed)
    px = kp[:, :2] * size
    # every changed pixel lies near a keypoint group's outline (within a group's box + 3 px)
    near = np.zeros_like(changed)
    for group in KEYPOINT_GROUPS:
        p = px[keypoint_slice(group)]
        x0, y0 = np.floor(p.min(0) - 3).astype(int)
        x1, y1 = np.ceil(p.max(0) + 3).astype(int)
        near[max(y0, 0) : y1 + 1, max(x0, 0) : x1 + 1] = True
    assert changed.any() and not (changed & ~near).any()
    # ... and every contour and brow point has a drawn pixel within 2 px
    for group in ("left_eye", "right_eye", "left_brow", "right_brow"):
        for x, y in px[keypoint_slice(group)]:
            assert (np.hypot(xs - x, ys - y) <= 2.0).any(), (group, x, y)
    # the sides have their own colours: the subject's left eye (image right) is drawn in LEFT_COLOUR
    def dominant(group):
        p = px[keypoint_slice(group)]
        x0, y0 = p.min(0).astype(int)
        x1, y1 = p.max(0).astype(int)
        region = out[y0 : y1 + 1, x0 : x1 + 1].reshape(-1, 3).astype(int)
        return region[np.abs(region - canvas[0, 0]).sum(1).argmax()]

    assert np.abs(dominant("left_eye") - LEFT_COLOUR).sum() < np.abs(dominant("left_eye") - RIGHT_COLOUR).sum()
    assert np.abs(dominant("right_eye") - RIGHT_COLOUR).sum() < np.abs(dominant("right_eye") - LEFT_COLOUR).sum()

    # a group with a missing point is left out, the rest is still drawn; 2-column keypoints work
    missing = kp[:, :2].copy()
    missing[keypoint_slice("left_brow")] = np.nan
    out2 = draw_keypoints(canvas, missing)
    p = px[keypoint_slice("left_brow")]
    (x0, y0), (x1, y1) = p.min(0).astype(int) - 2, p.max(0).astype(int) + 3
    brow_only = (slice(y0, y1), slice(x0, x1))
    assert (out2[brow_only] == canvas[brow_only]).all() and (out[brow_only] != canvas[brow_only]).any()
    assert (out2 != canvas).any()


# ---------------------------------------------------------------------------------------------
# preview.mp4
# ---------------------------------------------------------------------------------------------
def _probe(path: Path) -> dict:
    with av.open(str(path)) as c:
        v = c.streams.video[0]
        frames = [f.to_ndarray(format="rgb24") for f in c.decode(v)]
        info = {"n": len(frames), "size": frames[0].shape, "first": frames[0], "fps": float(v.average_rate),
                "codec": v.codec_context.name, "audio": None}
    with av.open(str(path)) as c:
        if c.streams.audio:
            a = c.streams.audio[0]
            info["audio"] = float(a.duration * a.time_base)
            info["audio_codec"] = a.codec_context.name
            info["audio_rate"] = a.codec_context.sample_rate
    return info


def _write_wav(path: Path, seconds: float, rate: int, channels: int) -> None:
    n = int(seconds * rate)
    tone = (0.3 * 32767 * np.sin(2 * np.pi * 220 * np.arange(n) / rate)).astype("<i2")
    with wave.open(str(path), "wb") as w:
        w.setnchannels(channels)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(np.repeat(tone, channels).tobytes())


def test_preview_without_audio_on_a_blank_canvas(tmp_path):
    kp = np.repeat(_synthetic_keypoints()[None], 30, axis=0)
    kp[:, :, 0] += np.linspace(-0.05, 0.05, 30)[:, None]  # the face drifts right
    out = write_preview(tmp_path / "preview.mp4", kp, None, size=128)
    info = _probe(out)
    assert info["n"] == 30 and info["size"] == (128, 128, 3) and info["fps"] == 25 and info["codec"] == "h264"
    assert info["audio"] is None
    assert [p.name for p in tmp_path.iterdir()] == ["preview.mp4"]


def test_preview_on_the_reference_with_audio_trimmed_and_padded(tmp_path):
    kp = np.repeat(_synthetic_keypoints()[None], 30, axis=0)
    reference = np.zeros((300, 200, 3), np.uint8)
    reference[:, :, 1] = 180  # a green portrait, not square: stretched to size x size
    short = _probe(write_preview(tmp_path / "short.mp4", kp, reference, size=96, audio_path=SAMPLE_WAV))
    assert short["n"] == 30 and short["size"] == (96, 96, 3)
    assert abs(short["audio"] - 30 / 25) <= 0.1  # 5 s of speech cut to the 1.2 s of video
    assert short["audio_codec"] == "aac" and short["audio_rate"] == 16000
    assert abs(short["first"][2, 2].astype(int) - [0, 180, 0]).max() < 20  # the portrait is the background

    long_kp = np.repeat(kp[:1], 150 + 25, axis=0)  # 7 s of video, 5 s of speech: padded with silence
    long = _probe(write_preview(tmp_path / "long.mp4", long_kp, None, size=64, audio_path=SAMPLE_WAV))
    assert long["n"] == 175 and abs(long["audio"] - 7.0) <= 0.1


@pytest.mark.parametrize(("rate", "channels", "expected_rate"), [(44100, 2, 44100), (7000, 1, 48000)])
def test_preview_audio_at_any_rate(tmp_path, rate, channels, expected_rate):
    wav = tmp_path / "speech.wav"
    _write_wav(wav, 1.0, rate, channels)
    frames = (np.full((64, 64, 3), i * 8, np.uint8) for i in range(20))
    assert write_video(tmp_path / "v.mp4", frames, size=64, audio_path=wav) == 20
    info = _probe(tmp_path / "v.mp4")
    assert info["n"] == 20 and abs(info["audio"] - 0.8) <= 0.1 and info["audio_rate"] == expected_rate


def test_preview_errors_leave_no_file(tmp_path):
    kp = np.repeat(_synthetic_keypoints()[None], 3, axis=0)
    with pytest.raises(PreviewInputError, match="no audio file"):
        write_preview(tmp_path / "a.mp4", kp, size=64, audio_path=tmp_path / "missing.wav")
    with pytest.raises(PreviewInputError, match="even"):
        write_preview(tmp_path / "a.mp4", kp, size=65)
    with pytest.raises(PreviewInputError, match="keypoints must be"):
        write_preview(tmp_path / "a.mp4", kp[:, :60], size=64)
    with pytest.raises(PreviewInputError, match="frame 1"):
        frames = iter([np.zeros((64, 64, 3), np.uint8), np.zeros((32, 32, 3), np.uint8)])
        write_video(tmp_path / "a.mp4", frames, size=64)
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------------------------------------
# blendshapes.csv (Live Link Face layout)
# ---------------------------------------------------------------------------------------------
EXPECTED_HEADER = (
    "Timecode,BlendshapeCount,"
    "EyeBlinkLeft,EyeLookDownLeft,EyeLookInLeft,EyeLookOutLeft,EyeLookUpLeft,EyeSquintLeft,EyeWideLeft,"
    "EyeBlinkRight,EyeLookDownRight,EyeLookInRight,EyeLookOutRight,EyeLookUpRight,EyeSquintRight,EyeWideRight,"
    "JawForward,JawRight,JawLeft,JawOpen,MouthClose,MouthFunnel,MouthPucker,MouthRight,MouthLeft,"
    "MouthSmileLeft,MouthSmileRight,MouthFrownLeft,MouthFrownRight,MouthDimpleLeft,MouthDimpleRight,"
    "MouthStretchLeft,MouthStretchRight,MouthRollLower,MouthRollUpper,MouthShrugLower,MouthShrugUpper,"
    "MouthPressLeft,MouthPressRight,MouthLowerDownLeft,MouthLowerDownRight,MouthUpperUpLeft,MouthUpperUpRight,"
    "BrowDownLeft,BrowDownRight,BrowInnerUp,BrowOuterUpLeft,BrowOuterUpRight,CheekPuff,CheekSquintLeft,"
    "CheekSquintRight,NoseSneerLeft,NoseSneerRight,TongueOut,"
    "HeadYaw,HeadPitch,HeadRoll,LeftEyeYaw,LeftEyePitch,LeftEyeRoll,RightEyeYaw,RightEyePitch,RightEyeRoll"
)
REST = np.array([0.3, 0.1, 0.12, 0.05, 0.06, 0.2, 0.4, 0.0, 0.15, 0.2, 0.05, 0.02, 0.0, 0.1, 3.0, -2.0, 1.0])


def _read_csv(path: Path) -> tuple[list[str], list[str], np.ndarray]:
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    header, body = rows[0], rows[1:]
    assert all(len(r) == 63 and r[1] == "61" for r in body)  # timecode, count, 61 values
    return header, [r[0] for r in body], np.array([[float(x) for x in r[2:]] for r in body])


def _nonzero_columns(header: list[str], values: np.ndarray) -> set[str]:
    return {header[2 + j] for j in np.flatnonzero(np.abs(values).max(axis=0) > 1e-6)}


def test_live_link_csv_layout_and_rest(tmp_path):
    T = 60
    controls = np.tile(REST, (T, 1))
    path = write_live_link_csv(tmp_path / "blendshapes.csv", controls, REST, fps=25, gaze_deg_per_unit=30.0)
    header, times, values = _read_csv(path)
    assert ",".join(header) == EXPECTED_HEADER
    assert values.shape == (T, 61)
    assert not np.abs(values).any()  # a face at rest exports zeros everywhere
    assert "-0.000000" not in path.read_text()
    parsed = [tuple(int(x) for x in tc.replace(".", ":").split(":")) for tc in times]
    assert parsed == sorted(parsed) and len(set(parsed)) == T  # strictly increasing
    assert times[0] == "00:00:00:00.000" and times[24] == "00:00:00:24.000" and times[25] == "00:00:01:00.000"
    assert live_link_timecode(25 * 3661 + 7, 25) == "01:01:01:07.000"


def test_live_link_csv_channels(tmp_path):
    T = 40
    controls = np.tile(REST, (T, 1))
    controls[10:15, C["AU45L"]] = REST[C["AU45L"]] + np.array([0.3, 0.7, 0.8, 0.7, 0.3])  # a left wink
    header, _, values = _read_csv(write_live_link_csv(tmp_path / "a.csv", controls, REST, 25, 30.0))
    assert _nonzero_columns(header, values) == {"EyeBlinkLeft"}
    np.testing.assert_allclose(values[10:15, header.index("EyeBlinkLeft") - 2], [0.3, 0.7, 0.8, 0.7, 0.3], atol=1e-6)

    controls = np.tile(REST, (T, 1))
    controls[:, C["gaze_left"]] = REST[C["gaze_left"]] + 0.4  # the subject looks to their left
    header, _, values = _read_csv(write_live_link_csv(tmp_path / "b.csv", controls, REST, 25, 30.0))
    assert _nonzero_columns(header, values) == {"EyeLookOutLeft", "EyeLookInRight", "LeftEyeYaw", "RightEyeYaw"}
    col = {name: values[:, header.index(name) - 2] for name in header[2:]}
    np.testing.assert_allclose(col["EyeLookOutLeft"], 0.4, atol=1e-6)
    np.testing.assert_allclose(col["EyeLookInRight"], 0.4, atol=1e-6)
    np.testing.assert_allclose(col["LeftEyeYaw"], math.radians(0.4 * 30.0), atol=1e-6)

    controls = np.tile(REST, (T, 1))
    controls[:, C["yaw"]] += 10.0  # toward the subject's left
    controls[:, C["pitch"]] -= 8.0  # chin down
    controls[:, C["roll"]] += 5.0
    controls[:, C["gaze_down"]] += 0.5
    controls[:, C["AU41"]] = 0.6  # droop: half of it reads as closure on both eyes
    controls[:, C["AU4L"]] = 0.0  # below its rest: exports 0, not a negative weight
    header, _, values = _read_csv(write_live_link_csv(tmp_path / "c.csv", controls, REST, 25, 20.0))
    col = {name: values[:, header.index(name) - 2] for name in header[2:]}
    assert _nonzero_columns(header, values) == {
        "HeadYaw", "HeadPitch", "HeadRoll", "EyeLookDownLeft", "EyeLookDownRight", "LeftEyePitch", "RightEyePitch",
        "EyeBlinkLeft", "EyeBlinkRight",
    }
    np.testing.assert_allclose(col["HeadYaw"], math.radians(10.0), atol=1e-6)
    np.testing.assert_allclose(col["HeadPitch"], math.radians(8.0), atol=1e-6)  # ARKit: + = face tilts down
    np.testing.assert_allclose(col["HeadRoll"], -math.radians(5.0), atol=1e-6)
    np.testing.assert_allclose(col["LeftEyePitch"], math.radians(0.5 * 20.0), atol=1e-6)  # looking down: +
    np.testing.assert_allclose(col["EyeBlinkLeft"], AU41_BLINK_FACTOR * 0.6, atol=1e-6)


def test_arkit_curves_invert_the_proxies():
    """With rest 0, the forward proxy table (face/proxies.py) reads the exported curves back."""
    rng = np.random.default_rng(3)
    T = 50
    controls = np.zeros((T, N_CHANNELS))
    au = [C[n] for n in ("AU1", "AU2L", "AU2R", "AU4L", "AU4R", "AU5", "AU7", "AU45L", "AU45R")]
    controls[:, au] = rng.uniform(0, 1, (T, len(au)))
    h, v = rng.uniform(-1, 1, T), rng.uniform(-1, 1, T)
    controls[:, C["gaze_left"]], controls[:, C["gaze_right"]] = np.clip(h, 0, None), np.clip(-h, 0, None)
    controls[:, C["gaze_up"]], controls[:, C["gaze_down"]] = np.clip(v, 0, None), np.clip(-v, 0, None)
    curves = arkit_blendshapes(controls, np.zeros(N_CHANNELS))
    assert curves.shape == (T, 52) and len(ARKIT_NAMES) == 52 and ARKIT_NAMES[-1] == "tongueOut"
    lower_face = [ARKIT_INDEX[n] for n in ARKIT_NAMES if n.startswith(("mouth", "jaw", "cheek", "nose", "tongue"))]
    assert len(lower_face) == 52 - 14 - 5 and not curves[:, lower_face].any()  # only the 14 eye and 5 brow shapes move
    mediapipe = np.zeros((T, len(BLENDSHAPE_NAMES)), np.float32)  # ARKit names -> MediaPipe's layout
    for name, i in ARKIT_INDEX.items():
        if name in BS:
            mediapipe[:, BS[name]] = curves[:, i]
    back = au_proxies(mediapipe)
    np.testing.assert_allclose(np.delete(back, 7, axis=1), controls[:, au], atol=1e-6)  # AU41 has no proxy
    np.testing.assert_allclose(gaze_proxies(mediapipe, down_blink_coupling=0.0), controls[:, 10:14], atol=1e-6)
