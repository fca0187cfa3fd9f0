"""The reference portrait of Stage 1: its pixels, its head pose and where its face sits.

Stage 1 starts the compiled head pose from the portrait's own pose and Π projects the keypoints
onto the portrait's own face, so both are measured here, once, with MediaPipe FaceLandmarker in
IMAGE mode (the same model bundle as the extract job's VIDEO mode), helped by the full-range face
detector for faces too small for the landmarker's own detector (``ReferenceReader``). The placement uses the
extract job's conventions exactly (cogportrait.face.pose): pixel units (x·W, −y·H, −z·W), the
centre is the rigid anchors' centroid, the inter-ocular distance (IOD) joins the eye-contour
centroids — measured in 3-D, so it does not shrink when the head turns (the rotated-frame IOD of
``canonical_clip``). With that, ``mapping.pose_and_project`` of the portrait's own canonical
keypoints lands back on its measured keypoints (tested).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from cogportrait.config import ExtractConfig
from cogportrait.face.landmarker import FaceObservation
from cogportrait.face.mapping import Placement
from cogportrait.face.model_files import face_landmarker_path
from cogportrait.face.pose import (
    RIGID_ANCHORS,
    head_pose_from_rotation,
    inter_ocular,
    normalise_points,
    rotation_from_transform,
    to_pixels,
)
from cogportrait.schema import CLIP_SIZE, KEYPOINT_INDICES, N_BLENDSHAPES, N_LANDMARKS

log = logging.getLogger("cogportrait.face.reference")

MAX_FACES = 16  # faces looked for in a portrait; more than one -> the largest, with a warning
CROP_SCALE = 2.0  # a face only the full-range detector found is landmarked in a crop this x its box
NEUTRAL_GREY = 128  # the blank canvas of neutral_reference: strokes of any colour stay visible


class ReferencePortraitError(ValueError):
    """The reference portrait cannot be used (unreadable, or no face): a user error, one line."""




@dataclass(frozen=True)
class Reference:
    """A reference portrait measured for Stage 1.

    ``keypoints`` are the 62 eye-region keypoints in the image's normalised coordinates (x right,
    y down, [0, 1] of width/height; z in x's scale), ``landmarks`` all 478 points alike and
    ``rotation`` the head rotation (camera frame); all three are None for the neutral canvas.
    """

    image: np.ndarray  # H x W x 3 uint8 RGB
    head_pose: np.ndarray  # yaw, pitch, roll (degrees, DESIGN.md signs)
    placement: Placement
    keypoints: np.ndarray | None = None  # 62 x 3
    rotation: np.ndarray | None = None  # 3 x 3
    landmarks: np.ndarray | None = None  # all 478 x 3 FaceLandmarker points, same coordinates
    path: str | None = None

    @property
    def has_face(self) -> bool:
        return self.keypoints is not None

    def canonical_keypoints(self) -> np.ndarray:
        """The portrait's own 62 keypoints pose-free (IOD units): Rᵀ (p − centre) / IOD."""
        if self.keypoints is None or self.rotation is None:
            raise ValueError("the neutral reference has no measured face")
        px = to_pixels(self.keypoints, self.placement.width, self.placement.height)
        centre = np.asarray(self.placement.centre_px, dtype=np.float64)
        return normalise_points(px[None], self.rotation[None], centre[None], self.placement.iod_px)[0]


class ImageLandmarker:
    """MediaPipe FaceLandmarker in IMAGE mode (no tracking: every call stands alone)."""

    def __init__(self, cfg: ExtractConfig, max_faces: int = MAX_FACES) -> None:
        # mediapipe is imported here so that importing cogportrait.face stays cheap
        import mediapipe as mp
        from mediapipe.tasks.python import BaseOptions, vision

        self._mp = mp
        options = vision.FaceLandmarkerOptions(
            base_options=BaseOptions(model_asset_path=str(face_landmarker_path(cfg.landmarker_model or None))),
            running_mode=vision.RunningMode.IMAGE,
            num_faces=max_faces,
            min_face_detection_confidence=cfg.min_detection_confidence,
            min_face_presence_confidence=cfg.min_presence_confidence,
            output_face_blendshapes=True,
            output_facial_transformation_matrixes=True,
        )
        self._landmarker = vision.FaceLandmarker.create_from_options(options)

    def detect(self, rgb: np.ndarray) -> list[FaceObservation]:
        """Every face found in one RGB image (possibly none), in MediaPipe's order."""
        image = self._mp.Image(image_format=self._mp.ImageFormat.SRGB, data=np.ascontiguousarray(rgb))
        result = self._landmarker.detect(image)
        faces = []
        for k, marks in enumerate(result.face_landmarks):
            lms = np.array([(p.x, p.y, p.z) for p in marks], dtype=np.float32)
            bs = np.array([c.score for c in result.face_blendshapes[k]], dtype=np.float32)
            mat = np.asarray(result.facial_transformation_matrixes[k], dtype=np.float32).reshape(4, 4)
            if lms.shape != (N_LANDMARKS, 3) or bs.shape != (N_BLENDSHAPES,):
                raise RuntimeError(f"unexpected FaceLandmarker output shapes {lms.shape}, {bs.shape}")
            faces.append(FaceObservation(landmarks=lms, blendshapes=bs, transform=mat))
        return faces

    def close(self) -> None:
        self._landmarker.close()

    def __enter__(self) -> ImageLandmarker:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close()


def load_rgb(path: str | Path) -> np.ndarray:
    """An image file as H x W x 3 uint8 RGB, upright per its EXIF orientation (phone portraits)."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            im = ImageOps.exif_transpose(im)
            rgb = np.asarray(im.convert("RGB"), dtype=np.uint8)
    except (OSError, UnidentifiedImageError, ValueError) as err:  # missing, unreadable, not an image
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise ReferencePortraitError(f"cannot read reference image {path}: {reason}") from err
    if rgb.ndim != 3 or rgb.shape[0] < 1 or rgb.shape[1] < 1:
        raise ReferencePortraitError(f"cannot read reference image {path}: empty image")
    return np.ascontiguousarray(rgb)


def face_area_px(landmarks: np.ndarray, width: int, height: int) -> float:
    """Area of a face's landmark bounding box in pixels (how "largest face" is decided)."""
    x, y = landmarks[:, 0] * width, landmarks[:, 1] * height
    return float((x.max() - x.min()) * (y.max() - y.min()))


def _covers(face: FaceObservation, box: tuple[float, ...], width: int, height: int) -> bool:
    """Whether a landmarked face contains the centre of a detector box (the same face)."""
    cx, cy = (box[0] + box[2]) / 2 / width, (box[1] + box[3]) / 2 / height
    lm = face.landmarks
    return bool(lm[:, 0].min() <= cx <= lm[:, 0].max() and lm[:, 1].min() <= cy <= lm[:, 1].max())


def square_crop(rgb: np.ndarray, box: tuple[float, ...], scale: float = CROP_SCALE) -> tuple[np.ndarray, int, int, int]:
    """A square crop ``scale`` x the box's longer side around its centre, black outside the image.

    Returns (crop, x0, y0, side) with (x0, y0) the crop's top-left corner in image pixels.
    """
    h, w = rgb.shape[:2]
    side = max(8, int(round(scale * max(box[2] - box[0], box[3] - box[1]))))
    x0 = int(round((box[0] + box[2]) / 2 - side / 2))
    y0 = int(round((box[1] + box[3]) / 2 - side / 2))
    crop = np.zeros((side, side, 3), dtype=np.uint8)
    xa, ya, xb, yb = max(0, x0), max(0, y0), min(w, x0 + side), min(h, y0 + side)
    if xb > xa and yb > ya:
        crop[ya - y0 : yb - y0, xa - x0 : xb - x0] = rgb[ya:yb, xa:xb]
    return crop, x0, y0, side


def uncrop(face: FaceObservation, x0: int, y0: int, side: int, width: int, height: int) -> FaceObservation:
    """Landmarks found in a square crop, back in the full image's normalised coordinates.

    z is in the scale of x, so it rescales from the crop's side to the image width. The
    transformation matrix is kept: its rotation depends on the face, not on where the crop sits
    (up to the small perspective difference of an off-centre face).
    """
    lm = np.asarray(face.landmarks, dtype=np.float64)
    out = np.stack([(x0 + lm[:, 0] * side) / width, (y0 + lm[:, 1] * side) / height, lm[:, 2] * side / width], axis=1)
    return FaceObservation(landmarks=out.astype(np.float32), blendshapes=face.blendshapes, transform=face.transform)


def face_crop(rgb: np.ndarray, face: FaceObservation, scale: float, size: int = CLIP_SIZE) -> tuple[np.ndarray, FaceObservation]:
    """The square face crop (``scale`` x the landmark box, ``size``²) and the face's landmarks in it
    (the inverse of ``uncrop``; the rotation does not depend on where the crop sits)."""
    h, w = rgb.shape[:2]
    lm = np.asarray(face.landmarks, dtype=np.float64)
    box = (lm[:, 0].min() * w, lm[:, 1].min() * h, lm[:, 0].max() * w, lm[:, 1].max() * h)
    crop, x0, y0, side = square_crop(rgb, box, scale)
    inside = np.stack([(lm[:, 0] * w - x0) / side, (lm[:, 1] * h - y0) / side, lm[:, 2] * w / side], axis=1)
    resized = cv2.resize(crop, (size, size), interpolation=cv2.INTER_AREA if side > size else cv2.INTER_LINEAR)
    return resized, FaceObservation(landmarks=inside.astype(np.float32), blendshapes=face.blendshapes, transform=face.transform)


def placement_from_landmarks(landmarks: np.ndarray, width: int, height: int) -> Placement:
    """Placement of one face: rigid-anchor centroid and 3-D eye-centroid distance, in pixels."""
    px = to_pixels(np.asarray(landmarks, dtype=np.float64), width, height)
    centre = px[list(RIGID_ANCHORS)].mean(axis=0)
    iod = float(inter_ocular(px[list(KEYPOINT_INDICES)]))
    return Placement(centre_px=(float(centre[0]), float(centre[1]), float(centre[2])), iod_px=iod, width=width, height=height)


def reference_from_face(rgb: np.ndarray, face: FaceObservation, path: str | None = None) -> Reference:
    """A Reference from an image and the face (image coordinates) chosen in it."""
    h, w = rgb.shape[:2]
    rotation = rotation_from_transform(face.transform)
    return Reference(
        image=rgb,
        head_pose=head_pose_from_rotation(rotation),
        placement=placement_from_landmarks(face.landmarks, w, h),
        keypoints=np.asarray(face.landmarks, dtype=np.float64)[list(KEYPOINT_INDICES)],
        rotation=rotation,
        landmarks=np.asarray(face.landmarks, dtype=np.float64),
        path=path,
    )


class ReferenceReader:
    """Measures reference portraits: FaceLandmarker (IMAGE mode) plus the full-range face detector.

    FaceLandmarker's own detector is short-range: it finds a face that fills much of the frame (a
    portrait) but misses the ~100 px faces of a group photo. So the full-range detector (the one
    curate uses) also looks at the image, and the largest face it finds that the landmarker missed
    is landmarked on a square crop around it. Of every face found, the largest is used.
    """

    def __init__(self, cfg: ExtractConfig | None = None) -> None:
        from cogportrait.curate.tracking import FaceTracker

        cfg = cfg or ExtractConfig()
        self._landmarker = ImageLandmarker(cfg)
        self._detector = FaceTracker(cfg.min_detection_confidence, min_face_px=0.0, multi_ratio=1.0)

    def faces(self, rgb: np.ndarray) -> tuple[list[FaceObservation], int]:
        """The faces landmarked (image coordinates; at most one from a crop) and how many were seen.

        The count includes detector boxes that were not landmarked (only the largest missed one
        is), so the several-faces warning is right even when only one face could be landmarked.
        """
        h, w = rgb.shape[:2]
        found = self._landmarker.detect(rgb)
        missed = [b for b in self._detector.detect(rgb) if not any(_covers(f, b, w, h) for f in found)]
        seen = len(found) + len(missed)
        if missed:
            box = max(missed, key=lambda b: (b[2] - b[0]) * (b[3] - b[1]))
            crop, x0, y0, side = square_crop(rgb, box)
            in_crop = self._landmarker.detect(crop)
            if in_crop:
                best = max(in_crop, key=lambda f: face_area_px(f.landmarks, side, side))
                found.append(uncrop(best, x0, y0, side, w, h))
        return found, seen

    def measure(self, rgb: np.ndarray, path: str | None = None, crop_scale: float | None = None) -> Reference:
        """The Reference of an RGB image: its largest face; a warning when there are several.

        With ``crop_scale`` the reference becomes curate's normalised face crop: a square of
        ``crop_scale`` x the face's landmark box, resized to 512², its landmarks moved into it. Stage 1
        keypoints are in [0, 1] of that crop (DESIGN.md), whatever the portrait's size and framing.
        """
        h, w = rgb.shape[:2]
        name = path if path is not None else "<image>"
        faces, seen = self.faces(rgb)
        if not faces:
            raise ReferencePortraitError(f"no face found in the reference portrait {name}")
        areas = [face_area_px(f.landmarks, w, h) for f in faces]
        if seen > 1:
            log.warning("%d faces in the reference portrait %s; using the largest (%.0f px²)", seen, name, max(areas))
        face = faces[int(np.argmax(areas))]
        if crop_scale is not None:
            rgb, face = face_crop(rgb, face, crop_scale)
        return reference_from_face(rgb, face, path)

    def read(self, path: str | Path) -> Reference:
        return self.measure(load_rgb(path), str(path))

    def close(self) -> None:
        self._landmarker.close()
        self._detector.close()

    def __enter__(self) -> ReferenceReader:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close()


def read_reference(path: str | Path, cfg: ExtractConfig | None = None, crop_scale: float | None = None) -> Reference:
    """Read and measure a reference portrait; ReferencePortraitError (one line) when it cannot be used.
    ``crop_scale`` (curate.crop_scale) turns it into the normalised face crop (``ReferenceReader.measure``)."""
    rgb = load_rgb(path)  # before loading models: a bad path fails fast
    with ReferenceReader(cfg) as reader:
        return reader.measure(rgb, str(path), crop_scale)


def neutral_reference(size: int = 512) -> Reference:
    """A blank grey canvas with a frontal face placement (no ``--reference``): pose 0, 0, 0 and
    ``Placement()``'s layout scaled to ``size``."""
    if size < 1:
        raise ValueError(f"size must be positive, got {size}")
    default = Placement()
    k = size / default.width
    placement = Placement(
        centre_px=tuple(float(c * k) for c in default.centre_px),  # type: ignore[arg-type]
        iod_px=default.iod_px * k,
        width=size,
        height=size,
    )
    return Reference(
        image=np.full((size, size, 3), NEUTRAL_GREY, dtype=np.uint8), head_pose=np.zeros(3), placement=placement
    )
