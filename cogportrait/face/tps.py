"""Thin-plate-spline (TPS) warps of keypoints: Stage 2 aligns Stage 1's keypoints to the portrait.

Stage 1 projects the compiled keypoints (Π) onto where a face sits at rest; the reference portrait's
detected 62 keypoints are where *this* face sits. A TPS fitted on the 62 control points neutral →
reference carries every compiled frame onto the portrait's own eye shapes (its eye size, lid shape,
brow arch), not just its position, and is the identity where the two already agree. The spline is
OpenCV contrib's ``ThinPlateSplineShapeTransformer``; this module only feeds it well-conditioned
numbers and checks what comes back, because OpenCV fails silently (a singular system yields a
garbage transform, no error).

Coordinates are DESIGN.md's: x, y in [0, 1] of the image (x right, y down); z, when present, is
not warped (the spline is 2-D) and passes through unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from cogportrait.schema import N_KEYPOINTS

MIN_CONTROL_POINTS = 3  # the affine part alone has 3 unknowns per coordinate
MIN_ASPECT = 1e-3  # control points flatter than 1:1000 (a line, not a face) leave the affine part undetermined
MIN_SEPARATION = 1e-6  # two control points closer than this (in RMS radii) are one point twice
MAX_RESIDUAL = 1e-2  # at regularization 0 the spline must hit its targets: a miss past this many RMS radii
# (~1 px for a face in a 512 px frame) is a failed float32 solve, not rounding


class AlignmentError(ValueError):
    """Control points a thin-plate spline cannot be fitted to (non-finite, too few, collinear,
    coincident), or keypoints of the wrong shape: bad input, not a bug, so the message names it."""


def _rms_radius(points: np.ndarray) -> float:
    return float(np.sqrt(((points - points.mean(axis=0)) ** 2).sum(axis=1).mean()))


def _readonly(points: np.ndarray) -> np.ndarray:
    points = np.array(points, dtype=np.float64)
    points.flags.writeable = False
    return points


@dataclass(frozen=True, eq=False)
class ThinPlateSpline:
    """The TPS interpolating ``source`` (N x 2) onto ``target`` (N x 2): ``apply(source) ≈ target``.

    Validated on construction, including a trial solve whose misses at the control points are
    checked; raises ``AlignmentError`` for control points it cannot use. The object holds plain
    arrays only: the OpenCV solve is redone per ``apply`` call (``_transformer``). With ``regularization`` 0 it interpolates (control points land on their targets);
    a positive value trades exactness for smoothness (OpenCV adds it to the kernel's diagonal).

    OpenCV's argument order. ``estimateTransformation(a, b, matches)`` solves for the map f with
    f(a) = b, and ``applyTransformation(p)`` evaluates f(p): source first, target second, applied
    to source-space points (tps_trans.cpp builds the kernel on its first argument, the right-hand
    side from its second, and ``applyTransformation`` evaluates that fit; tests/test_pose_video.py
    checks an affine map comes out forward, not inverted). The opposite order one often reads about
    belongs to ``warpImage``, which uses f as a remap *lookup* (output pixel p samples the input at
    f(p)), so moving image content from a to b needs ``estimateTransformation(b, a)`` there — not here.

    The well-conditioned frame. OpenCV builds and solves the system in float32, with the kernel
    r²·log(r² + FLT_EPSILON), and never reports a failed solve. Both point sets are therefore
    mapped by the one similarity that centres the source on its centroid and scales it to unit RMS
    radius, so kernel entries and the affine columns (1, x, y) are all O(1); the spline is fitted
    and evaluated there and mapped back. At regularization 0 a TPS commutes with a similarity of
    domain and range, so this changes no answer, only its rounding (and the regularization is
    thereby in that unit frame, independent of image size and face size). Measured on 62-point
    eye layouts (random placement, size 0.2-1.2x, near-similarity targets, some lids nearly
    closed): fitted in raw [0, 1] coordinates, about 1 fit in 150 misses its own control points by
    most of the image; in pixels (x 512) the misses grow past a pixel once two points are
    ~0.15 px apart; in the unit frame the worst miss was 8e-4 of the image.
    """

    source: np.ndarray  # N x 2, read-only float64
    target: np.ndarray  # N x 2, read-only float64
    regularization: float = 0.0
    centre: np.ndarray = field(init=False, repr=False)  # the normalising similarity: (p - centre) / scale
    scale: float = field(init=False, repr=False)

    def __post_init__(self) -> None:
        source, target = _readonly(self.source), _readonly(self.target)
        for name, pts in (("source", source), ("target", target)):
            if pts.ndim != 2 or pts.shape[1] != 2:
                raise AlignmentError(f"{name} control points must be N x 2, got {pts.shape}")
            bad = np.flatnonzero(~np.isfinite(pts).all(axis=1))
            if bad.size:
                raise AlignmentError(f"{name} control points {bad.tolist()} are not finite")
        if source.shape != target.shape:
            raise AlignmentError(f"source {source.shape} and target {target.shape} differ in shape")
        n = source.shape[0]
        if n < MIN_CONTROL_POINTS:
            raise AlignmentError(f"a thin-plate spline needs at least {MIN_CONTROL_POINTS} control points, got {n}")
        if not (np.isfinite(self.regularization) and self.regularization >= 0):
            raise AlignmentError(f"regularization must be finite and >= 0, got {self.regularization}")
        scale = _rms_radius(source)
        singular = np.linalg.svd(source - source.mean(axis=0), compute_uv=False)
        if scale == 0 or singular[1] < MIN_ASPECT * singular[0]:
            raise AlignmentError("source control points are collinear (or all one point): they span no 2-D area")
        object.__setattr__(self, "source", source)
        object.__setattr__(self, "target", target)
        object.__setattr__(self, "regularization", float(self.regularization))
        object.__setattr__(self, "centre", source.mean(axis=0))
        object.__setattr__(self, "scale", scale)
        if self.regularization == 0:
            # coincident sources make the interpolation system singular; OpenCV would not say so
            unit = self._normalise(source)
            gap = np.sqrt(((unit[:, None] - unit[None]) ** 2).sum(axis=-1))
            np.fill_diagonal(gap, np.inf)
            i, j = np.unravel_index(int(gap.argmin()), gap.shape)
            if gap[i, j] < MIN_SEPARATION:
                raise AlignmentError(
                    f"source control points {min(i, j)} and {max(i, j)} coincide; "
                    "an interpolating spline cannot send one point to two targets (use regularization > 0)"
                )
        fitted = self._apply_xy(source)
        if not np.isfinite(fitted).all():
            raise AlignmentError("the thin-plate spline system did not solve (non-finite result)")
        if self.regularization == 0:
            miss = float(np.abs(self._normalise(fitted) - self._normalise(target)).max())
            allowed = MAX_RESIDUAL * max(1.0, float(np.abs(self._normalise(target)).max()))
            if miss > allowed:
                raise AlignmentError(
                    f"the thin-plate spline misses its own control points by {miss:.3g} RMS radii: "
                    "the control points are too close to degenerate for a float32 solve (use regularization > 0)"
                )

    def _normalise(self, xy: np.ndarray) -> np.ndarray:
        return (xy - self.centre) / self.scale

    def _transformer(self):
        """A fresh OpenCV transformer fitted in the unit frame.

        Rebuilt per call rather than held: solving 62 points takes microseconds, and a spline of
        plain arrays pickles and copies where an OpenCV object does not.
        """
        import cv2

        transformer = cv2.createThinPlateSplineShapeTransformer(self.regularization)
        matches = [cv2.DMatch(i, i, 0) for i in range(self.source.shape[0])]
        transformer.estimateTransformation(
            self._normalise(self.source).astype(np.float32)[None],
            self._normalise(self.target).astype(np.float32)[None],
            matches,
        )
        return transformer

    def _apply_xy(self, xy: np.ndarray) -> np.ndarray:
        """M x 2 finite points -> M x 2 warped points (float64)."""
        if xy.shape[0] == 0:
            return np.empty((0, 2))
        _, warped = self._transformer().applyTransformation(self._normalise(xy).astype(np.float32)[None])
        return warped.reshape(-1, 2).astype(np.float64) * self.scale + self.centre

    def apply(self, points: np.ndarray) -> np.ndarray:
        """Warp ``points`` (..., 2 or 3): x, y mapped, z (if any) unchanged; same shape back.

        A point with a non-finite x or y (a frame without a face) comes back with x, y NaN rather
        than being warped to wherever OpenCV would send NaN.
        """
        pts = np.asarray(points)
        if pts.ndim < 1 or pts.shape[-1] not in (2, 3):
            raise AlignmentError(f"points must be (..., 2|3), got {pts.shape}")
        out = np.array(pts, dtype=np.result_type(pts.dtype, np.float32))
        xy = out[..., :2].reshape(-1, 2)
        finite = np.isfinite(xy).all(axis=1)
        warped = np.full(xy.shape, np.nan)
        warped[finite] = self._apply_xy(xy[finite].astype(np.float64))
        out[..., :2] = warped.reshape(out.shape[:-1] + (2,))
        return out


def _check_keypoints(name: str, keypoints: np.ndarray, ndim: int) -> np.ndarray:
    kp = np.asarray(keypoints)
    if kp.ndim != ndim or kp.shape[-2] != N_KEYPOINTS or kp.shape[-1] not in (2, 3):
        expected = ("T, " if ndim == 3 else "") + f"{N_KEYPOINTS}, 2|3"
        raise AlignmentError(f"{name} must be ({expected}), got {kp.shape}")
    return kp


def align_to_reference(
    keypoints: np.ndarray, neutral: np.ndarray, reference: np.ndarray, regularization: float = 0.0
) -> np.ndarray:
    """Stage 2's alignment: every frame of ``keypoints`` (T x 62 x 2|3) warped by the TPS that
    carries ``neutral`` (62 x 2|3: where the compiled sequence's face sits at rest, Π of the neutral
    controls) onto ``reference`` (62 x 2|3: the portrait's detected keypoints).

    A frame equal to ``neutral`` comes out as ``reference``; z passes through; frames without a
    face (non-finite) stay non-finite. Raises ``AlignmentError`` when the control points are
    non-finite or degenerate.
    """
    kp = _check_keypoints("keypoints", keypoints, 3)
    src = _check_keypoints("neutral", neutral, 2)
    dst = _check_keypoints("reference", reference, 2)
    try:
        spline = ThinPlateSpline(src[:, :2], dst[:, :2], regularization)
    except AlignmentError as error:
        raise AlignmentError(f"cannot align neutral (source) to reference (target) keypoints: {error}") from error
    return spline.apply(kp)
