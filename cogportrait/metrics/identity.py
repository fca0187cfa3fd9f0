"""Identity embeddings for ID-Sim: ArcFace from a local insightface model folder, or dlib.

ID-Sim (paper §4.1) is the ArcFace cosine similarity between the generated frames and the
reference portrait. No face-recognition weights ship with the project and none are fetched, so
a backend is used only when the user has one:

* ``arcface``: an insightface model pack folder (e.g. ``buffalo_l``) holding a recognition ONNX
  model — the one whose input is 3 × 112 × 112 (``w600k_r50.onnx`` in buffalo_l; the detector files
  beside it are not needed: faces are aligned from MediaPipe's landmarks instead). Run with
  onnxruntime, the way insightface runs it: the face similarity-aligned to ArcFace's 5-point
  template at 112², RGB, (x − 127.5) / 127.5.
* ``dlib``: the optional extra (``pip install .[dlib]``): dlib's ResNet face descriptor from
  ``face_recognition_models``. Reported under its own name (``ID-Sim (dlib)``): its numbers are not
  ArcFace's.

``make_identity_backend`` returns None, with the reason, when the chosen backend cannot run; the
evaluation then lists ID-Sim as skipped with that reason, never as a zero.
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

from cogportrait.config import IDENTITY_BACKENDS

ARCFACE_SIZE = 112
# ArcFace's alignment template for 112 x 112 crops (insightface): eye, eye, nose tip, mouth corner,
# mouth corner, left to right in the image
ARCFACE_TEMPLATE = np.array([[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366],
                             [41.5493, 92.3655], [70.7299, 92.2041]], dtype=np.float64)
# MediaPipe face-mesh indices of the same five points: the two iris centres, the nose tip and the
# two mouth corners (which of each pair is on the image's left is decided per frame by x)
MP_IRIS = (468, 473)
MP_NOSE_TIP = 1
MP_MOUTH = (61, 291)


class IdentityBackendError(ValueError):
    """A configured identity backend cannot be loaded (a user error: one line, exit 2)."""


def five_points(landmarks_px: np.ndarray) -> np.ndarray:
    """(5, 2) ArcFace alignment points from MediaPipe's 478 landmarks in pixels."""
    lm = np.asarray(landmarks_px, dtype=np.float64)[:, :2]
    eyes = sorted((lm[i] for i in MP_IRIS), key=lambda p: p[0])
    mouth = sorted((lm[i] for i in MP_MOUTH), key=lambda p: p[0])
    return np.stack([eyes[0], eyes[1], lm[MP_NOSE_TIP], mouth[0], mouth[1]])


def align_face(rgb: np.ndarray, points: np.ndarray, size: int = ARCFACE_SIZE) -> np.ndarray:
    """The face warped by the similarity transform that best maps ``points`` onto the template."""
    matrix, _ = cv2.estimateAffinePartial2D(points.astype(np.float32), (ARCFACE_TEMPLATE * size / ARCFACE_SIZE).astype(np.float32),
                                            method=cv2.LMEDS)
    if matrix is None:
        raise ValueError("face alignment failed (degenerate landmarks)")
    return cv2.warpAffine(rgb, matrix, (size, size), borderValue=0.0)


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = np.asarray(a, np.float64).ravel(), np.asarray(b, np.float64).ravel()
    return float(a @ b / max(np.linalg.norm(a) * np.linalg.norm(b), 1e-12))


class ArcFaceEmbedder:
    """An insightface recognition ONNX model from a local folder (loaded once)."""

    name = "ID-Sim"

    def __init__(self, folder: str | Path) -> None:
        import onnxruntime as ort

        folder = Path(folder)
        if not folder.is_dir():
            raise IdentityBackendError(f"ArcFace model folder {folder} not found (evaluate_videos.arcface_dir)")
        options = ort.SessionOptions()
        options.intra_op_num_threads = 1
        for path in sorted(folder.glob("*.onnx")):
            session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
            shape = session.get_inputs()[0].shape
            if len(shape) == 4 and list(shape[1:]) == [3, ARCFACE_SIZE, ARCFACE_SIZE]:
                self.session, self.model_file = session, path.name
                self.input_name = session.get_inputs()[0].name
                return
        raise IdentityBackendError(f"{folder}: no recognition model (an .onnx whose input is 3x{ARCFACE_SIZE}x{ARCFACE_SIZE})")

    def embed(self, rgb: np.ndarray, landmarks_px: np.ndarray) -> np.ndarray:
        face = align_face(rgb, five_points(landmarks_px)).astype(np.float32)
        blob = ((face - 127.5) / 127.5).transpose(2, 0, 1)[None]
        return np.asarray(self.session.run(None, {self.input_name: blob})[0][0], dtype=np.float64)


class DlibEmbedder:
    """dlib's 128-d face descriptor (the ``dlib`` extra), on the MediaPipe face box."""

    name = "ID-Sim (dlib)"

    def __init__(self) -> None:
        import dlib
        import face_recognition_models

        self.shape = dlib.shape_predictor(face_recognition_models.pose_predictor_model_location())
        self.encoder = dlib.face_recognition_model_v1(face_recognition_models.face_recognition_model_location())
        self._dlib = dlib

    def embed(self, rgb: np.ndarray, landmarks_px: np.ndarray) -> np.ndarray:
        lm = np.asarray(landmarks_px, dtype=np.float64)[:, :2]
        x0, y0 = lm.min(axis=0)
        x1, y1 = lm.max(axis=0)
        box = self._dlib.rectangle(int(x0), int(y0), int(x1), int(y1))
        shape = self.shape(np.ascontiguousarray(rgb), box)
        return np.asarray(self.encoder.compute_face_descriptor(np.ascontiguousarray(rgb), shape), dtype=np.float64)


def make_identity_backend(kind: str, arcface_dir: str) -> tuple[ArcFaceEmbedder | DlibEmbedder | None, str]:
    """(backend, "") or (None, why ID-Sim is skipped)."""
    if kind == "none":
        return None, "no identity backend chosen (evaluate_videos.identity_backend: none)"
    if kind == "arcface":
        if not arcface_dir:
            return None, "no ArcFace model folder given (evaluate_videos.arcface_dir; an insightface pack such as buffalo_l)"
        return ArcFaceEmbedder(arcface_dir), ""
    if kind == "dlib":
        try:
            return DlibEmbedder(), ""
        except ImportError as err:
            return None, f"the dlib extra is not installed ({err.name}); pip install '.[dlib]'"
    raise IdentityBackendError(f"unknown identity backend {kind!r}; valid: {', '.join(IDENTITY_BACKENDS)}")
