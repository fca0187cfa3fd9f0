"""Pluggable AU/gaze proxy backends.

A backend turns one clip's FaceLandmarker output (and, if it asks for them, the RGB frames)
into the 10 AU proxies and 4 gaze proxies of DESIGN.md. The default ``blendshape`` backend maps
MediaPipe blendshapes; ``pyfeat`` runs py-feat's AU model from a local model directory when the
user has one (py-feat cannot fetch models here, and does not import with CPU torch: it is optional).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

import numpy as np

from cogportrait.face.proxies import au_proxies, gaze_proxies
from cogportrait.schema import AU_PROXY_NAMES

log = logging.getLogger("cogportrait.face.au_backends")


class AUBackendError(RuntimeError):
    """A backend that cannot run as configured (missing package or model files)."""


class AUBackend(Protocol):
    name: str
    needs_images: bool  # extract keeps the clip's RGB frames only for backends that ask

    def clip_proxies(
        self, blendshapes: np.ndarray, landmarks: np.ndarray, present: np.ndarray, images: list[np.ndarray] | None
    ) -> tuple[np.ndarray, np.ndarray]:
        """(AU Tx10 with AU41 NaN, gaze Tx4); rows where ``present`` is False are ignored."""
        ...


class BlendshapeBackend:
    """DESIGN.md's blendshape proxies (the default)."""

    name = "blendshape"
    needs_images = False

    def __init__(self, gaze_down_blink_coupling: float) -> None:
        self.gaze_down_blink_coupling = gaze_down_blink_coupling

    def clip_proxies(self, blendshapes, landmarks, present, images=None):
        return au_proxies(blendshapes), gaze_proxies(blendshapes, self.gaze_down_blink_coupling)


# py-feat AU columns -> our channels (py-feat AUs are bilateral; AU43 is eyes closed)
PYFEAT_AU_MAP: dict[str, tuple[str, ...]] = {
    "AU1": ("AU01",),
    "AU2L": ("AU02",),
    "AU2R": ("AU02",),
    "AU4L": ("AU04",),
    "AU4R": ("AU04",),
    "AU5": ("AU05",),
    "AU7": ("AU07",),
    "AU45L": ("AU43",),
    "AU45R": ("AU43",),
}


class PyFeatBackend:
    """py-feat AU intensities from a local model directory; gaze stays on blendshapes.

    ``model_dir`` must hold the files py-feat's ``Detector`` would otherwise download; we never
    let it reach a hub. Frames go through py-feat with our landmarks' face boxes.
    """

    name = "pyfeat"
    needs_images = True

    def __init__(self, model_dir: str | Path, gaze_down_blink_coupling: float, au_model: str = "xgb") -> None:
        model_dir = Path(model_dir).expanduser()
        if not model_dir.is_dir():
            raise AUBackendError(f"py-feat model directory {model_dir} does not exist")
        try:
            from feat import Detector  # optional dependency
        except ImportError as err:
            raise AUBackendError(
                "the pyfeat AU backend needs py-feat installed (pip install py-feat); "
                "it does not import with CPU-only torch here"
            ) from err
        import os

        os.environ.setdefault("HF_HUB_OFFLINE", "1")  # models come from model_dir only
        self._detector = Detector(au_model=au_model, device="cpu", model_dir=str(model_dir))
        self._gaze_coupling = gaze_down_blink_coupling

    def clip_proxies(self, blendshapes, landmarks, present, images=None):
        if images is None:
            raise AUBackendError("pyfeat backend needs the clip's frames")
        au = np.full((len(images), len(AU_PROXY_NAMES)), np.nan, dtype=np.float32)
        idx = [i for i, ok in enumerate(present) if ok]
        if idx:
            frame_batch = np.stack([images[i] for i in idx])
            result = self._detector.detect(frame_batch, data_type="tensor")
            aus = result.aus
            for c, name in enumerate(AU_PROXY_NAMES):
                cols = PYFEAT_AU_MAP.get(name)
                if cols:
                    au[idx, c] = aus[list(cols)].to_numpy(dtype=np.float32).mean(axis=1)[: len(idx)]
        return au, gaze_proxies(blendshapes, self._gaze_coupling)


BACKENDS: dict[str, Callable[..., AUBackend]] = {"blendshape": BlendshapeBackend, "pyfeat": PyFeatBackend}


def make_backend(name: str, model_dir: str | None, gaze_down_blink_coupling: float) -> AUBackend:
    """Build a backend by name; names outside BACKENDS fail with the list of valid ones."""
    if name == "blendshape":
        return BlendshapeBackend(gaze_down_blink_coupling)
    if name == "pyfeat":
        if not model_dir:
            raise AUBackendError("the pyfeat backend needs extract.au_model_dir (a local py-feat model folder)")
        return PyFeatBackend(model_dir, gaze_down_blink_coupling=gaze_down_blink_coupling)
    raise AUBackendError(f"unknown AU backend {name!r}; choose one of: {', '.join(BACKENDS)}")
