"""Controls -> ARKit blendshape curves, and the Live Link Face CSV that carries them to an avatar.

MediaPipe's blendshapes carry ARKit's names, so the inverse of DESIGN.md's proxy table (the forward
one is ``cogportrait.face.proxies``) turns the 17 controls into the 52 ARKit curves that any
ARKit-rigged avatar (MetaHuman, VRM, Blender shape keys) understands. Left/right are the subject's
own on both sides, as in ARKit. Stage 1 does not control the mouth, cheeks, nose, jaw or tongue:
those curves are 0.

Rest. Blendshapes rest well above 0 and differ per person (DESIGN.md), and the controls keep that
per-person rest. An avatar's neutral face is all zeros, so every channel is exported as its
distance above a ``rest`` vector (17,), clipped to [0, 1]: a face at rest exports zeros, and a
channel below its rest (brows lowered under a raised-brow baseline) exports 0, not a negative
weight that no rig accepts. The values are not rescaled by ``1 - rest``: a subject whose full
closure reads 0.75 above rest exports 0.75, as the proxies measured it. Head angles and gaze are
exported relative to the same rest (pass 0 there for absolute angles).

The CSV layout (the file the Live Link Face iPhone app exports per take) was assembled from public
readers and writers of that file, none of them Epic's own documentation:

* header ``Timecode,BlendshapeCount,`` then 61 names: the 52 ARKit shapes in PascalCase in the
  app's export order (which lists ``JawRight`` before ``JawLeft`` and ``MouthRight`` before
  ``MouthLeft``, unlike the streaming enum), then ``HeadYaw, HeadPitch, HeadRoll, LeftEyeYaw,
  LeftEyePitch, LeftEyeRoll, RightEyeYaw, RightEyePitch, RightEyeRoll``. Seen in a unit test
  that pins a header "byte for byte from a real capture", in the Blender LiveLinkFace add-on's
  CSV import, and in a MeFaMo fork's CSV export; the streaming order is PyLiveLinkFace's
  ``FaceBlendShape`` enum and Unreal's ``EARFaceBlendShape``. Some writers spell the second column
  ``BlendShapeCount``; readers index by position or case-insensitively, so either reads.
* each row: timecode, the count 61, then 61 numbers.
* ``Timecode`` is ``HH:MM:SS:FF.sss``: FF the frame inside the second at the take's rate, and the
  digits after the dot the sub-frame fraction (an app row at 60 fps reads ``14:03:52:28.207``, and
  28/60 is not .207, so it is not milliseconds). Rows here fall exactly on frames: ``.000``.
* rotations in radians (the Diffeomorphic DAZ importer feeds the Live Link columns straight into
  Blender Euler angles, which are radians, while its FaceCap importer converts degrees).
* rotation signs: ASSUMED, not checked against a device. They follow ARKit's face-anchor frame
  (right-handed; x toward the face's own left, y up, z out of the face toward the viewer) with
  right-hand-rule angles: yaw about y (+ turns the face toward its own left, as our ``yaw``),
  pitch about x (+ tilts the face down, so ``HeadPitch = -pitch``), roll about z (+ lifts the
  face's left side, the top of the head toward its right shoulder, so ``HeadRoll = -roll``). The
  eyes use the same frame: ``EyeYaw`` + toward the subject's left, ``EyePitch`` + downward, roll 0.
  The app itself is known to invert pitch and yaw in landscape orientation; flip in the rig if a
  particular target disagrees.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np

from cogportrait.face.proxies import AU_PROXY_BLENDSHAPES
from cogportrait.io.atomic import atomic_path
from cogportrait.schema import BLENDSHAPE_NAMES, CHANNEL_INDEX, N_CHANNELS

# The 52 ARKit shapes, camelCase: MediaPipe's 51 (its order, "_neutral" dropped) + tongueOut,
# which MediaPipe does not estimate.
ARKIT_NAMES: tuple[str, ...] = tuple(n for n in BLENDSHAPE_NAMES if n != "_neutral") + ("tongueOut",)
ARKIT_INDEX: dict[str, int] = {name: i for i, name in enumerate(ARKIT_NAMES)}
N_ARKIT = len(ARKIT_NAMES)

# The Live Link Face CSV's 52 shape columns, in the app's export order (module docstring).
LIVE_LINK_BLENDSHAPES: tuple[str, ...] = (
    "EyeBlinkLeft", "EyeLookDownLeft", "EyeLookInLeft", "EyeLookOutLeft", "EyeLookUpLeft",
    "EyeSquintLeft", "EyeWideLeft", "EyeBlinkRight", "EyeLookDownRight", "EyeLookInRight",
    "EyeLookOutRight", "EyeLookUpRight", "EyeSquintRight", "EyeWideRight",
    "JawForward", "JawRight", "JawLeft", "JawOpen",
    "MouthClose", "MouthFunnel", "MouthPucker", "MouthRight", "MouthLeft",
    "MouthSmileLeft", "MouthSmileRight", "MouthFrownLeft", "MouthFrownRight",
    "MouthDimpleLeft", "MouthDimpleRight", "MouthStretchLeft", "MouthStretchRight",
    "MouthRollLower", "MouthRollUpper", "MouthShrugLower", "MouthShrugUpper",
    "MouthPressLeft", "MouthPressRight", "MouthLowerDownLeft", "MouthLowerDownRight",
    "MouthUpperUpLeft", "MouthUpperUpRight",
    "BrowDownLeft", "BrowDownRight", "BrowInnerUp", "BrowOuterUpLeft", "BrowOuterUpRight",
    "CheekPuff", "CheekSquintLeft", "CheekSquintRight", "NoseSneerLeft", "NoseSneerRight",
    "TongueOut",
)
LIVE_LINK_ROTATIONS: tuple[str, ...] = (
    "HeadYaw", "HeadPitch", "HeadRoll",
    "LeftEyeYaw", "LeftEyePitch", "LeftEyeRoll",
    "RightEyeYaw", "RightEyePitch", "RightEyeRoll",
)
LIVE_LINK_VALUES: tuple[str, ...] = LIVE_LINK_BLENDSHAPES + LIVE_LINK_ROTATIONS  # 61 per row
LIVE_LINK_HEADER: tuple[str, ...] = ("Timecode", "BlendshapeCount") + LIVE_LINK_VALUES
# Position of each Live Link shape column in ARKIT_NAMES (PascalCase -> camelCase).
_LIVE_LINK_FROM_ARKIT = np.array([ARKIT_INDEX[n[0].lower() + n[1:]] for n in LIVE_LINK_BLENDSHAPES])
assert N_ARKIT == 52 and len(LIVE_LINK_VALUES) == 61 and sorted(_LIVE_LINK_FROM_ARKIT) == list(range(52))

# AU41 (sustained lid droop) has no ARKit shape; it is drawn as a partial eyeBlink. AU41 = 1 means
# the upper lid has come down to the iris centre (DESIGN.md: the iris-centre-to-upper-lid distance
# shrinks to 0), which is about half of the open aperture, i.e. half a closure.
AU41_BLINK_FACTOR = 0.5

# control channel -> ARKit shapes it drives one-to-one (the inverse of proxies.AU_PROXY_BLENDSHAPES;
# AU5/AU7 were the mean of the two eyes, so both eyes get the value)
_AU_TO_ARKIT: dict[str, tuple[str, ...]] = {c: AU_PROXY_BLENDSHAPES[c] for c in ("AU1", "AU2L", "AU2R", "AU4L", "AU4R", "AU5", "AU7")}


class ArkitInputError(ValueError):
    """Controls or rest vector of the wrong shape for the ARKit export."""


def _deltas(controls: np.ndarray, rest: np.ndarray) -> np.ndarray:
    """controls - rest as float64 (T, 17); a non-finite value counts as rest (exports 0)."""
    c = np.asarray(controls, dtype=np.float64)
    r = np.asarray(rest, dtype=np.float64).reshape(-1)
    if c.ndim != 2 or c.shape[1] != N_CHANNELS:
        raise ArkitInputError(f"controls must be (T, {N_CHANNELS}), got {c.shape}")
    if r.shape != (N_CHANNELS,):
        raise ArkitInputError(f"rest must have {N_CHANNELS} values, got {r.shape}")
    d = c - r
    return np.where(np.isfinite(d), d, 0.0)


def signed_gaze_delta(d: np.ndarray) -> np.ndarray:
    """(T, 17) rest deltas -> (T, 2) signed gaze: horizontal (+ = toward the subject's left), vertical (+ = up)."""
    g = CHANNEL_INDEX
    h = d[:, g["gaze_left"]] - d[:, g["gaze_right"]]
    v = d[:, g["gaze_up"]] - d[:, g["gaze_down"]]
    return np.stack([h, v], axis=-1)


def arkit_blendshapes(controls: np.ndarray, rest: np.ndarray) -> np.ndarray:
    """(T, 17) controls -> (T, 52) ARKit weights in ``ARKIT_NAMES`` order, each in [0, 1].

    Every weight is the channel's rise above ``rest`` (module docstring). eyeBlink = AU45 +
    AU41_BLINK_FACTOR x AU41 of the same eye (AU41 is one channel for both eyes). Gaze is made
    signed first (left - right, up - down) and split back per eye: looking toward the subject's
    left turns the left eye outward and the right eye inward (DESIGN.md's gaze proxies, inverted).
    """
    d = _deltas(controls, rest)
    out = np.zeros((len(d), N_ARKIT), dtype=np.float64)
    for channel, shapes in _AU_TO_ARKIT.items():
        for shape in shapes:
            out[:, ARKIT_INDEX[shape]] = d[:, CHANNEL_INDEX[channel]]
    droop = AU41_BLINK_FACTOR * np.maximum(d[:, CHANNEL_INDEX["AU41"]], 0.0)
    out[:, ARKIT_INDEX["eyeBlinkLeft"]] = d[:, CHANNEL_INDEX["AU45L"]] + droop
    out[:, ARKIT_INDEX["eyeBlinkRight"]] = d[:, CHANNEL_INDEX["AU45R"]] + droop
    h, v = signed_gaze_delta(d).T
    for shape in ("eyeLookOutLeft", "eyeLookInRight"):
        out[:, ARKIT_INDEX[shape]] = h
    for shape in ("eyeLookInLeft", "eyeLookOutRight"):
        out[:, ARKIT_INDEX[shape]] = -h
    for shape in ("eyeLookUpLeft", "eyeLookUpRight"):
        out[:, ARKIT_INDEX[shape]] = v
    for shape in ("eyeLookDownLeft", "eyeLookDownRight"):
        out[:, ARKIT_INDEX[shape]] = -v
    return np.clip(out, 0.0, 1.0).astype(np.float32)


def live_link_rotations(controls: np.ndarray, rest: np.ndarray, gaze_deg_per_unit: float) -> np.ndarray:
    """(T, 17) controls -> (T, 9) head and eye rotations in radians, ``LIVE_LINK_ROTATIONS`` order.

    Head angles are degrees in the controls (DESIGN.md signs), relative to ``rest``; the eyes turn
    by the signed gaze times ``gaze_deg_per_unit`` (the critic's ``gaze_deg_per_unit``), both eyes
    alike (no vergence in the controls). Signs: module docstring.
    """
    d = _deltas(controls, rest)
    h, v = signed_gaze_delta(d).T
    eye_yaw = np.radians(h * gaze_deg_per_unit)
    eye_pitch = -np.radians(v * gaze_deg_per_unit)
    zero = np.zeros(len(d))
    cols = (
        np.radians(d[:, CHANNEL_INDEX["yaw"]]),
        -np.radians(d[:, CHANNEL_INDEX["pitch"]]),
        -np.radians(d[:, CHANNEL_INDEX["roll"]]),
        eye_yaw, eye_pitch, zero,
        eye_yaw, eye_pitch, zero,
    )
    return np.stack(cols, axis=-1).astype(np.float32)


def live_link_timecode(frame: int, fps: int) -> str:
    """``HH:MM:SS:FF.000`` of a frame index counted from 00:00:00:00 (sub-frame always 0)."""
    seconds, ff = divmod(int(frame), int(fps))
    minutes, ss = divmod(seconds, 60)
    hh, mm = divmod(minutes, 60)
    return f"{hh:02d}:{mm:02d}:{ss:02d}:{ff:02d}.000"


def live_link_values(controls: np.ndarray, rest: np.ndarray, gaze_deg_per_unit: float) -> np.ndarray:
    """(T, 61) rows of the Live Link CSV after its two leading columns (``LIVE_LINK_VALUES`` order)."""
    shapes = arkit_blendshapes(controls, rest)[:, _LIVE_LINK_FROM_ARKIT]
    return np.concatenate([shapes, live_link_rotations(controls, rest, gaze_deg_per_unit)], axis=1)


def write_live_link_csv(
    path: str | os.PathLike, controls: np.ndarray, rest: np.ndarray, fps: int, gaze_deg_per_unit: float
) -> Path:
    """Write the controls as a Live Link Face CSV (one row per frame at ``fps``), atomically."""
    if fps <= 0 or int(fps) != fps:
        raise ArkitInputError(f"fps must be a positive whole number for SMPTE timecodes, got {fps}")
    if not math.isfinite(gaze_deg_per_unit) or gaze_deg_per_unit <= 0:
        raise ArkitInputError(f"gaze_deg_per_unit must be > 0, got {gaze_deg_per_unit}")
    values = live_link_values(controls, rest, gaze_deg_per_unit) + np.float32(0.0)  # -0.0 -> 0.0
    count = str(len(LIVE_LINK_VALUES))
    lines = [",".join(LIVE_LINK_HEADER)]
    for t, row in enumerate(values):
        lines.append(",".join([live_link_timecode(t, int(fps)), count, *(f"{x:.6f}" for x in row)]))
    path = Path(path)
    with atomic_path(path, ".csv") as tmp:
        tmp.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path
