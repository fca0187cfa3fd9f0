"""Stage 2's pose video: the thin-plate-spline alignment of keypoints to the reference portrait
(cogportrait.face.tps) and the per-group-coloured rendering (cogportrait.face.render)."""

from __future__ import annotations

import pickle

import numpy as np
import pytest

from cogportrait.face.render import (
    POSE_GROUP_COLOURS,
    RenderInputError,
    render_pose_frame,
    render_pose_video,
)
from cogportrait.face.tps import AlignmentError, ThinPlateSpline, align_to_reference
from cogportrait.schema import KEYPOINT_GROUPS, N_KEYPOINTS, keypoint_slice


def _face_keypoints(rng: np.random.Generator | None = None, jitter: float = 0.0) -> np.ndarray:
    """62 x 3 keypoints laid out like a frontal face in [0, 1] (the subject's left on the image
    right): almond eye contours, arched brows (lower edge then upper, outer to inner), irises
    (centre, then 4 rim points); z a distinct value per point so pass-through is checkable."""
    kp = np.zeros((N_KEYPOINTS, 3))
    for side, cx, outward in (("left", 0.66, 1.0), ("right", 0.34, -1.0)):
        a = np.linspace(0, 2 * np.pi, 16, endpoint=False)
        eye = np.stack([cx + outward * 0.075 * np.cos(a), 0.47 + 0.028 * np.sin(a) * (1 + 0.3 * np.cos(a))], 1)
        kp[keypoint_slice(f"{side}_eye"), :2] = eye
        u = np.linspace(0, 1, 5)  # outer -> inner
        xs = cx + outward * (0.09 - 0.17 * u)
        arch = 0.025 * np.sin(np.pi * (0.2 + 0.7 * u))
        kp[keypoint_slice(f"{side}_brow"), :2] = np.concatenate(
            [np.stack([xs, 0.38 - arch], 1), np.stack([xs, 0.355 - arch], 1)]
        )
        b = np.array([0.0, np.pi / 2, np.pi, 3 * np.pi / 2])
        rim = np.stack([cx + 0.018 * np.cos(b), 0.47 + 0.018 * np.sin(b)], 1)
        kp[keypoint_slice(f"{side}_iris"), :2] = np.concatenate([[[cx, 0.47]], rim])
    kp[:, 2] = np.linspace(-0.05, 0.05, N_KEYPOINTS)
    if rng is not None:
        kp[:, :2] += rng.normal(0, jitter, (N_KEYPOINTS, 2))
    return kp


def _inside_hull(points: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """n points inside the convex hull of ``points``: random convex combinations of a few of them."""
    weights = rng.dirichlet(np.ones(4), n)
    picks = rng.integers(0, len(points), (n, 4))
    return (weights[..., None] * points[picks]).sum(axis=1)


def _tps_oracle(source: np.ndarray, target: np.ndarray, query: np.ndarray) -> np.ndarray:
    """The interpolating thin-plate spline in float64 from its definition: U(r) = r² log r²,
    [[K, P], [Pᵀ, 0]] [w; a] = [target; 0], f(q) = Σ w U(|q − sᵢ|) + a·(1, q)."""

    def kernel(a: np.ndarray, b: np.ndarray) -> np.ndarray:
        r2 = ((a[:, None] - b[None]) ** 2).sum(axis=-1)
        return np.where(r2 > 0, r2 * np.log(np.where(r2 > 0, r2, 1.0)), 0.0)

    n = len(source)
    system = np.zeros((n + 3, n + 3))
    system[:n, :n] = kernel(source, source)
    system[:n, n:] = np.column_stack([np.ones(n), source])
    system[n:, :n] = system[:n, n:].T
    rhs = np.zeros((n + 3, 2))
    rhs[:n] = target
    params = np.linalg.solve(system, rhs)
    return kernel(query, source) @ params[:n] + np.column_stack([np.ones(len(query)), query]) @ params[n:]


# ---------------------------------------------------------------------------------------------
# the thin-plate spline
# ---------------------------------------------------------------------------------------------
def test_tps_reproduces_an_affine_map_forward_not_inverted():
    """A TPS reproduces an affine map exactly, so away from the control points it must give the
    affine map itself, and not its inverse (OpenCV's argument-order trap)."""
    rng = np.random.default_rng(0)
    source = _face_keypoints(rng, 0.003)[:, :2]
    theta = np.deg2rad(12)
    rotation = np.array([[np.cos(theta), -np.sin(theta)], [np.sin(theta), np.cos(theta)]])
    linear = rotation @ np.array([[1.3, 0.25], [0.0, 0.9]])  # rotation, anisotropic scale, shear
    shift = np.array([0.04, -0.06])
    target = source @ linear.T + shift
    spline = ThinPlateSpline(source, target)

    query = _inside_hull(source, 300, rng)
    forward = query @ linear.T + shift
    inverse = (query - shift) @ np.linalg.inv(linear).T
    warped = spline.apply(query)
    assert np.abs(warped - forward).max() < 1e-4
    assert np.linalg.norm(warped - inverse, axis=1).min() > 1e-2
    assert np.abs(spline.apply(source) - target).max() < 1e-4


def test_tps_interpolates_its_control_points_and_matches_the_float64_spline():
    rng = np.random.default_rng(1)
    source = _face_keypoints(rng, 0.002)[:, :2]
    # a non-affine warp: a bulge plus per-point noise, the kind a different face's eyes need
    bulge = 0.15 * (source - 0.5) * np.exp(-(((source - 0.5) ** 2).sum(axis=1, keepdims=True)) / 0.05)
    target = 1.1 * (source - 0.5) + 0.52 + bulge + rng.normal(0, 0.004, source.shape)
    spline = ThinPlateSpline(source, target)
    assert np.abs(spline.apply(source) - target).max() < 1e-4
    query = _inside_hull(source, 200, rng)
    assert np.abs(spline.apply(query) - _tps_oracle(source, target, query)).max() < 1e-4


def test_tps_is_the_identity_when_source_is_target():
    rng = np.random.default_rng(2)
    source = _face_keypoints(rng, 0.003)[:, :2]
    query = np.concatenate([_inside_hull(source, 100, rng), rng.uniform(0, 1, (50, 2))])  # outside the hull too
    assert np.abs(ThinPlateSpline(source, source).apply(query) - query).max() < 1e-6


def test_tps_apply_passes_z_through_and_keeps_missing_points_missing():
    rng = np.random.default_rng(3)
    source = _face_keypoints(rng, 0.003)[:, :2]
    spline = ThinPlateSpline(source, source * 0.9 + 0.07)
    frames = np.repeat(_face_keypoints()[None], 4, axis=0)
    frames[1] = np.nan  # a frame without a face
    frames[2, 5, 1] = np.nan  # one coordinate missing: the point is missing
    frames[3, 7, 0] = np.inf
    out = spline.apply(frames)
    assert out.shape == frames.shape and out.dtype == np.float64
    np.testing.assert_array_equal(out[..., 2], frames[..., 2])  # z untouched, NaN z included
    assert np.isnan(out[1, :, :2]).all()
    assert np.isnan(out[2, 5, :2]).all() and np.isnan(out[3, 7, :2]).all()
    finite = np.isfinite(frames[..., :2]).all(axis=-1)
    assert np.isfinite(out[..., :2][finite]).all() and finite.sum() == N_KEYPOINTS + 2 * (N_KEYPOINTS - 1)
    np.testing.assert_allclose(out[0, :, :2], frames[0, :, :2] * 0.9 + 0.07, atol=1e-5)  # affine: exact
    # 2-column points, any leading shape, float32 stays float32, nothing at all is fine
    assert spline.apply(frames[0, :, :2].astype(np.float32)).dtype == np.float32
    assert spline.apply(np.zeros((0, 2))).shape == (0, 2)
    np.testing.assert_allclose(spline.apply(np.array([0.5, 0.5])), [0.52, 0.52], atol=1e-5)


def test_tps_regularization_trades_exactness_for_smoothness():
    rng = np.random.default_rng(4)
    source = _face_keypoints(rng, 0.002)[:, :2]
    target = source + rng.normal(0, 0.01, source.shape)
    misses = [
        np.sqrt(((ThinPlateSpline(source, target, lam).apply(source) - target) ** 2).mean())
        for lam in (0.0, 0.01, 1.0)
    ]
    assert misses[0] < 1e-5 < misses[1] < misses[2]
    # two control points in one place with two targets: impossible to interpolate, fine to smooth
    doubled = source.copy()
    doubled[1] = doubled[0]
    with pytest.raises(AlignmentError, match="0 and 1 coincide"):
        ThinPlateSpline(doubled, target)
    assert np.isfinite(ThinPlateSpline(doubled, target, 0.01).apply(source)).all()


def test_tps_pickles():
    rng = np.random.default_rng(5)
    source = _face_keypoints(rng, 0.002)[:, :2]
    spline = ThinPlateSpline(source, source + rng.normal(0, 0.005, source.shape))
    copy = pickle.loads(pickle.dumps(spline))
    np.testing.assert_array_equal(copy.apply(source), spline.apply(source))


def test_tps_rejects_unusable_control_points():
    source = _face_keypoints()[:, :2]
    assert issubclass(AlignmentError, ValueError)
    bad = source.copy()
    bad[9] = np.nan
    with pytest.raises(AlignmentError, match=r"source control points \[9\] are not finite"):
        ThinPlateSpline(bad, source)
    with pytest.raises(AlignmentError, match=r"target control points \[9\] are not finite"):
        ThinPlateSpline(source, bad)
    line = np.column_stack([np.linspace(0, 1, 62), np.linspace(0, 1, 62) * 0.5])
    with pytest.raises(AlignmentError, match="collinear"):
        ThinPlateSpline(line, line)
    with pytest.raises(AlignmentError, match="differ in shape"):
        ThinPlateSpline(source, source[:-1])
    with pytest.raises(AlignmentError, match="at least 3"):
        ThinPlateSpline(source[:2], source[:2])
    with pytest.raises(AlignmentError, match="regularization"):
        ThinPlateSpline(source, source, -1.0)
    with pytest.raises(AlignmentError, match="points must be"):
        ThinPlateSpline(source, source).apply(np.zeros((5, 4)))


# ---------------------------------------------------------------------------------------------
# align_to_reference
# ---------------------------------------------------------------------------------------------
def test_align_to_reference_carries_the_neutral_face_onto_the_portrait():
    rng = np.random.default_rng(6)
    neutral = _face_keypoints()
    # the portrait's face: smaller, shifted, its own eye shape
    reference = neutral.copy()
    reference[:, :2] = 0.8 * (neutral[:, :2] - 0.5) + [0.45, 0.55] + rng.normal(0, 0.003, (N_KEYPOINTS, 2))
    frames = np.repeat(neutral[None], 5, axis=0)
    frames[2, keypoint_slice("left_eye"), 1] += 0.01  # the left lid moves
    frames[4] = np.nan
    out = align_to_reference(frames, neutral, reference)
    assert out.shape == frames.shape
    np.testing.assert_allclose(out[0, :, :2], reference[:, :2], atol=1e-4)  # rest lands on the portrait
    np.testing.assert_array_equal(out[..., 2], frames[..., 2])
    assert np.isnan(out[4]).all()
    np.testing.assert_array_equal(out, ThinPlateSpline(neutral[:, :2], reference[:, :2]).apply(frames))


def test_align_to_reference_under_a_similarity_scales_motion_with_the_face():
    """When the portrait is the neutral face moved and scaled, the alignment is that similarity:
    a lid movement comes out scaled by the same factor."""
    neutral = _face_keypoints()
    reference = neutral.copy()
    reference[:, :2] = 1.5 * (neutral[:, :2] - 0.5) + [0.5, 0.45]
    moved = neutral.copy()
    moved[keypoint_slice("right_eye"), 1] += 0.008
    out = align_to_reference(moved[None], neutral, reference)[0]
    np.testing.assert_allclose(out[:, :2], 1.5 * (moved[:, :2] - 0.5) + [0.5, 0.45], atol=1e-4)


def test_align_to_reference_rejects_bad_inputs():
    neutral = _face_keypoints()
    frames = neutral[None]
    missing = neutral.copy()
    missing[keypoint_slice("left_iris")] = np.nan
    with pytest.raises(AlignmentError, match=r"neutral \(source\) to reference \(target\).*target control points \[52, 53"):
        align_to_reference(frames, neutral, missing)
    with pytest.raises(AlignmentError, match=r"neutral \(source\).*source control points"):
        align_to_reference(frames, missing, neutral)
    with pytest.raises(AlignmentError, match=r"keypoints must be \(T, 62, 2\|3\)"):
        align_to_reference(neutral, neutral, neutral)
    with pytest.raises(AlignmentError, match=r"reference must be \(62, 2\|3\)"):
        align_to_reference(frames, neutral, neutral[:60])


# ---------------------------------------------------------------------------------------------
# render_pose_frame / render_pose_video
# ---------------------------------------------------------------------------------------------
def _group_of_pixels(image: np.ndarray) -> np.ndarray:
    """Per pixel, the index (in POSE_GROUP_COLOURS order) of the group colour it is a shade of
    (anti-aliasing on black scales a colour, it does not turn it), -1 for black or mixed pixels."""
    colours = np.array(list(POSE_GROUP_COLOURS.values()), dtype=np.float64)
    colours /= np.linalg.norm(colours, axis=1, keepdims=True)
    px = image.reshape(-1, 3).astype(np.float64)
    norm = np.linalg.norm(px, axis=1)
    cosine = (px / np.maximum(norm, 1e-9)[:, None]) @ colours.T
    group = np.where((cosine.max(axis=1) > 0.995) & (norm > 40), cosine.argmax(axis=1), -1)
    return group.reshape(image.shape[:2])


def _hue(colour: tuple[int, int, int]) -> float:
    import colorsys

    return 360 * colorsys.rgb_to_hsv(*(c / 255 for c in colour))[0]


def test_pose_group_colours_are_distinct_and_overlaps_blend_to_no_group_colour():
    assert set(POSE_GROUP_COLOURS) == set(KEYPOINT_GROUPS)
    assert len(set(POSE_GROUP_COLOURS.values())) == len(KEYPOINT_GROUPS)
    assert all(len(c) == 3 and all(0 <= v <= 255 for v in c) for c in POSE_GROUP_COLOURS.values())
    # a blend of two colours has a hue between theirs: groups that overlap (an eye and its iris,
    # an eye and its brow) must be hue neighbours so no third group's hue lies between them
    hues = {group: _hue(colour) for group, colour in POSE_GROUP_COLOURS.items()}
    for side in ("left", "right"):
        for other in ("iris", "brow"):
            a, b = hues[f"{side}_eye"], hues[f"{side}_{other}"]
            gap = min(abs(a - b), 360 - abs(a - b))
            between = [g for g, h in hues.items() if 0 < min(abs(h - a), 360 - abs(h - a)) < gap
                       and 0 < min(abs(h - b), 360 - abs(h - b)) < gap]
            assert not between, (side, other, between)


@pytest.mark.parametrize("size", [256, (320, 200)])
def test_render_pose_frame_draws_each_group_in_its_colour_where_its_points_are(size):
    kp = _face_keypoints()
    frame = render_pose_frame(kp, size)
    w, h = (size, size) if isinstance(size, int) else size
    assert frame.shape == (h, w, 3) and frame.dtype == np.uint8
    groups = _group_of_pixels(frame)
    px = kp[:, :2] * [w, h]
    for index, group in enumerate(POSE_GROUP_COLOURS):
        ys, xs = np.nonzero(groups == index)
        assert len(xs), group
        pts = px[keypoint_slice(group)]
        (x0, y0), (x1, y1) = pts.min(axis=0) - 3, pts.max(axis=0) + 3
        # nothing of this group's colour away from its points
        assert ((xs >= x0) & (xs <= x1) & (ys >= y0) & (ys <= y1)).all(), group
        if group.endswith("iris"):
            cx, cy = pts[0]
            near = np.hypot(xs - cx, ys - cy) <= 1.5
            assert near.any(), group  # the filled centre dot
            assert groups[int(cy), int(cx)] == index, group  # the centre pixel is the iris's own colour
        else:
            for x, y in pts:  # every contour / brow point has its colour within 2 px
                assert (np.hypot(xs - x, ys - y) <= 2.0).any(), (group, x, y)
    # everything drawn belongs to some group's neighbourhood: no strokes to a corner
    drawn = frame.any(axis=2)
    x0, y0 = px.min(axis=0) - 3
    x1, y1 = px.max(axis=0) + 3
    ys, xs = np.nonzero(drawn)
    assert ((xs >= x0) & (xs <= x1) & (ys >= y0) & (ys <= y1)).all()


def test_render_pose_frame_leaves_out_missing_groups_and_a_missing_face():
    kp = _face_keypoints()
    assert not render_pose_frame(np.full((N_KEYPOINTS, 3), np.nan), 128).any()  # all black
    partial = kp[:, :2].copy()  # 2 columns work
    partial[keypoint_slice("left_brow")][3] = np.nan
    frame = render_pose_frame(partial, 256)
    groups = _group_of_pixels(frame)
    names = list(POSE_GROUP_COLOURS)
    assert not (groups == names.index("left_brow")).any()
    assert (groups == names.index("right_brow")).any() and (groups == names.index("left_eye")).any()


def test_render_pose_frame_thickness():
    kp = _face_keypoints()
    thin, thick = render_pose_frame(kp, 256, thickness=1), render_pose_frame(kp, 256, thickness=4)
    assert thick.any(axis=2).sum() > 2 * thin.any(axis=2).sum()
    np.testing.assert_array_equal(render_pose_frame(kp, 256), thin)  # the default at 256 px is 1 px


def test_render_pose_video_is_the_stack_of_its_frames():
    rng = np.random.default_rng(7)
    frames = np.repeat(_face_keypoints()[None], 6, axis=0)
    frames[:, :, :2] += rng.normal(0, 0.01, (6, 1, 2))  # the face moves
    frames[3] = np.nan
    video = render_pose_video(frames, (160, 96))
    assert video.shape == (6, 96, 160, 3) and video.dtype == np.uint8
    np.testing.assert_array_equal(video, np.stack([render_pose_frame(f, (160, 96)) for f in frames]))
    assert not video[3].any() and video[2].any()
    assert render_pose_video(frames[:0], 64).shape == (0, 64, 64, 3)


def test_render_pose_rejects_wrong_shapes():
    with pytest.raises(RenderInputError, match=r"\(62, 2\|3\)"):
        render_pose_frame(np.zeros((61, 2)), 64)
    with pytest.raises(RenderInputError, match=r"\(T, 62, 2\|3\)"):
        render_pose_video(np.zeros((62, 2)), 64)
    with pytest.raises(RenderInputError, match="positive"):
        render_pose_frame(np.zeros((62, 2)), 0)


def test_tps_stays_exact_with_nearly_coincident_control_points():
    """OpenCV solves in float32: fitted in raw [0, 1] coordinates, control points spread over the
    image plus two 1e-4 apart (a lid nearly closed) miss their targets by most of the image; the
    spline's unit frame keeps the fit exact (the reason for ThinPlateSpline's normalisation)."""
    rng = np.random.default_rng(8)
    source = np.concatenate([rng.uniform(0.25, 0.75, (60, 2)), [[0.5, 0.5], [0.5001, 0.5]]])
    linear, shift = np.array([[1.1, 0.2], [-0.15, 0.9]]), np.array([0.03, -0.02])
    spline = ThinPlateSpline(source, source @ linear.T + shift)
    query = _inside_hull(source, 100, rng)
    assert np.abs(spline.apply(query) - (query @ linear.T + shift)).max() < 1e-4
