"""AU and gaze proxies from MediaPipe blendshapes (DESIGN.md's table), and L/R mirroring.

The proxies are what the face model is fitted against; controls come from the keypoints by
inversion. Blendshapes rest well above 0 and differ per person, so nothing here thresholds:
thresholds are relative to each clip's baseline downstream.
"""

from __future__ import annotations

import numpy as np

from cogportrait.schema import AU_PROXY_NAMES, BLENDSHAPE_NAMES, GAZE_PROXY_NAMES

BS = {name: i for i, name in enumerate(BLENDSHAPE_NAMES)}

# channel -> blendshapes averaged into it (AU41 has none: it is geometric, computed by invert)
AU_PROXY_BLENDSHAPES: dict[str, tuple[str, ...]] = {
    "AU1": ("browInnerUp",),
    "AU2L": ("browOuterUpLeft",),
    "AU2R": ("browOuterUpRight",),
    "AU4L": ("browDownLeft",),
    "AU4R": ("browDownRight",),
    "AU5": ("eyeWideLeft", "eyeWideRight"),
    "AU7": ("eyeSquintLeft", "eyeSquintRight"),
    "AU41": (),
    "AU45L": ("eyeBlinkLeft",),
    "AU45R": ("eyeBlinkRight",),
}
GAZE_PROXY_BLENDSHAPES: dict[str, tuple[str, ...]] = {
    "gaze_left": ("eyeLookOutLeft", "eyeLookInRight"),
    "gaze_right": ("eyeLookInLeft", "eyeLookOutRight"),
    "gaze_up": ("eyeLookUpLeft", "eyeLookUpRight"),
    "gaze_down": ("eyeLookDownLeft", "eyeLookDownRight"),
}
assert tuple(AU_PROXY_BLENDSHAPES) == AU_PROXY_NAMES and tuple(GAZE_PROXY_BLENDSHAPES) == GAZE_PROXY_NAMES


def _mirror_pairs() -> list[tuple[int, int]]:
    pairs = []
    for name, i in BS.items():
        if name.endswith("Left"):
            pairs.append((i, BS[name[: -len("Left")] + "Right"]))
    return pairs


_BS_MIRROR = _mirror_pairs()


def mirror_blendshapes(bs: np.ndarray) -> np.ndarray:
    """Swap every …Left/…Right blendshape pair (for mirrored video)."""
    out = np.array(bs, copy=True)
    for a, b in _BS_MIRROR:
        out[..., a], out[..., b] = bs[..., b], bs[..., a]
    return out


def au_proxies(bs: np.ndarray) -> np.ndarray:
    """Tx52 blendshapes -> Tx10 AU proxies in DESIGN order; AU41 is NaN (invert computes it)."""
    bs = np.asarray(bs, dtype=np.float32)
    cols = []
    for names in AU_PROXY_BLENDSHAPES.values():
        if names:
            cols.append(bs[..., [BS[n] for n in names]].mean(axis=-1))
        else:
            cols.append(np.full(bs.shape[:-1], np.nan, dtype=np.float32))
    return np.stack(cols, axis=-1).astype(np.float32)


def gaze_proxies(bs: np.ndarray, down_blink_coupling: float) -> np.ndarray:
    """Tx52 blendshapes -> Tx4 gaze proxies (left, right, up, down), each in [0, 1].

    eyeLookDown rises with lid closure: ``down_blink_coupling`` × mean eyeBlink is removed from
    gaze_down (DESIGN.md); gaze_up stays low-confidence.
    """
    bs = np.asarray(bs, dtype=np.float32)
    cols = [bs[..., [BS[n] for n in names]].mean(axis=-1) for names in GAZE_PROXY_BLENDSHAPES.values()]
    g = np.stack(cols, axis=-1)
    if down_blink_coupling:
        blink = bs[..., [BS["eyeBlinkLeft"], BS["eyeBlinkRight"]]].mean(axis=-1)
        g[..., 3] = g[..., 3] - down_blink_coupling * blink
    return np.clip(g, 0.0, 1.0).astype(np.float32)


def signed_gaze(g: np.ndarray) -> np.ndarray:
    """(…x4 rectified) -> (…x2 signed): horizontal (+ = toward the subject's left), vertical (+ = up)."""
    return np.stack([g[..., 0] - g[..., 1], g[..., 2] - g[..., 3]], axis=-1)


def rectify_gaze(hv: np.ndarray) -> np.ndarray:
    """(…x2 signed) -> (…x4 rectified, each in [0, 1])."""
    h, v = hv[..., 0], hv[..., 1]
    return np.clip(np.stack([h, -h, v, -v], axis=-1), 0.0, 1.0)
