"""Head pose, pose normalisation and L/R / sign conventions, pinned on real frames.

The frame numbers below were checked by looking at the frames (curated 25 fps clips):
lp_d3 frame 223 turns toward the image right (the subject's left), frame 200 lowers the head;
edtalk frame 179 tilts the chin up; tpsmm frame 136 tilts the top of the head toward the image
left (the subject's right shoulder); lp_d0 frames 12-26 look toward the image right (the
subject's left), frames 30-39 toward the image left.
"""

from __future__ import annotations

import numpy as np
import pyarrow.compute as pc
import pytest

from cogportrait.face.extract import list_column, read_frames
from cogportrait.face.pose import (
    MIRROR_KEYPOINTS,
    head_pose_from_rotation,
    mirror_keypoint_groups,
    orthonormalise,
    rotation_from_head_pose,
    similarity_align,
)
from cogportrait.face.proxies import mirror_blendshapes, rectify_gaze, signed_gaze
from cogportrait.schema import BLENDSHAPE_NAMES, KEYPOINT_INDICES, keypoint_slice


def test_pose_angles_round_trip():
    rng = np.random.default_rng(0)
    pose = np.column_stack([rng.uniform(-60, 60, 200), rng.uniform(-45, 45, 200), rng.uniform(-40, 40, 200)])
    r = rotation_from_head_pose(pose)
    assert np.allclose(np.einsum("tji,tjk->tik", r, r), np.eye(3), atol=1e-9)
    assert np.allclose(np.linalg.det(r), 1.0)
    assert np.allclose(head_pose_from_rotation(r), pose, atol=1e-9)


def test_orthonormalise_removes_scale_and_noise():
    r = rotation_from_head_pose(np.array([[10.0, -5.0, 3.0]]))[0]
    noisy = 1.7 * r + np.random.default_rng(1).normal(0, 1e-3, (3, 3))
    assert np.allclose(orthonormalise(noisy), r, atol=1e-3)


def test_similarity_align_recovers_a_transform():
    rng = np.random.default_rng(2)
    dst = rng.normal(size=(16, 3))
    r = rotation_from_head_pose(np.array([[8.0, -4.0, 6.0]]))[0]
    src = (dst @ r.T) * 1.3 + np.array([1.0, -2.0, 0.5])
    rr, s, t = similarity_align(src[None], dst)
    back = s[0] * src @ rr[0].T + t[0]
    assert np.allclose(back, dst, atol=1e-9)


def _synthetic_face() -> np.ndarray:
    """62 x 3 image-space keypoints of a mirror-symmetric face built from geometry alone: the
    right-side contours are the left ones reflected (MediaPipe lists them in mirrored order),
    while both iris rings are listed as MediaPipe does, centre, +x, +y, −x, −y in image terms."""
    rng = np.random.default_rng(7)
    kp = np.zeros((62, 3))
    for left, right, dx in (("left_eye", "right_eye", 0.5), ("left_brow", "right_brow", 0.5)):
        pts = rng.normal(size=(keypoint_slice(left).stop - keypoint_slice(left).start, 3)) * 0.2 + [dx, 0.0, 0.0]
        kp[keypoint_slice(left)] = pts
        kp[keypoint_slice(right)] = pts * [-1.0, 1.0, 1.0]
    ring = np.array([[0, 0, 0], [1, 0, 0], [0, 1, 0], [-1, 0, 0], [0, -1, 0]], dtype=float) * 0.1
    kp[keypoint_slice("left_iris")] = ring + [0.5, 0.05, 0.0]
    kp[keypoint_slice("right_iris")] = ring + [-0.5, 0.05, 0.0]
    return kp


def test_mirror_puts_every_keypoint_on_its_twin():
    """Reflecting x and mirroring the groups gives back a symmetric face point for point, iris
    rings included; the twins are the known MediaPipe pairs; twice is the identity."""
    face = _synthetic_face()
    assert np.allclose(mirror_keypoint_groups(face * [-1.0, 1.0, 1.0]), face)
    twin = {KEYPOINT_INDICES[j]: KEYPOINT_INDICES[m] for j, m in enumerate(MIRROR_KEYPOINTS)}
    assert [twin[i] for i in (473, 474, 475, 476, 477, 263, 362, 276)] == [468, 471, 470, 469, 472, 33, 133, 46]
    assert all(twin[twin[i]] == i for i in twin)
    frames = np.random.default_rng(8).normal(size=(4, 62, 2))
    assert np.array_equal(mirror_keypoint_groups(mirror_keypoint_groups(frames)), frames)


def test_blendshape_order_matches_mediapipe():
    """BLENDSHAPE_NAMES is MediaPipe's category order (checked against the model's output names)."""
    from cogportrait.config import ExtractConfig
    from cogportrait.face.landmarker import VideoLandmarker

    from conftest import SAMPLE

    import decord

    reader = decord.VideoReader(str(SAMPLE / "videos" / "lp_d0_man_greenscreen_gaze_blink.mp4"))
    import mediapipe as mp

    with VideoLandmarker(ExtractConfig()) as lm:
        image = mp.Image(image_format=mp.ImageFormat.SRGB, data=reader.next().asnumpy())
        result = lm._landmarker.detect_for_video(image, 1)
    assert tuple(c.category_name for c in result.face_blendshapes[0]) == BLENDSHAPE_NAMES


def test_gaze_sign_helpers():
    g = np.array([[0.8, 0.0, 0.0, 0.3]])
    assert np.allclose(signed_gaze(g), [[0.8, -0.3]])
    assert np.allclose(rectify_gaze(signed_gaze(g)), [[0.8, 0.0, 0.0, 0.3]])
    bs = np.zeros((1, 52))
    bs[0, BLENDSHAPE_NAMES.index("eyeBlinkLeft")] = 0.9
    assert mirror_blendshapes(bs)[0, BLENDSHAPE_NAMES.index("eyeBlinkRight")] == 0.9


@pytest.fixture(scope="module")
def sample_frames(extracted_sample, curated_sample):
    from conftest import clip_ids_by_video

    frames = read_frames(extracted_sample)
    ids = clip_ids_by_video(curated_sample / "clips.parquet")

    def clip(video_id: str):
        return frames.filter(pc.equal(frames.column("clip_id"), ids[video_id][0])).sort_by("frame")

    return clip


@pytest.mark.slow
def test_left_eye_is_the_subjects_left_on_a_frontal_frame(sample_frames):
    clip = sample_frames("lp_d0")
    kp = list_column(clip, "keypoints", 186).reshape(-1, 62, 3)[5]  # frame 5: frontal, eyes open
    pose = list_column(clip, "head_pose", 3)[5]
    assert np.abs(pose).max() < 10
    x = {g: kp[keypoint_slice(g), 0].mean() for g in ("left_eye", "right_eye", "left_brow", "right_brow", "left_iris", "right_iris")}
    # non-mirrored video: the subject's left is the image right (x larger)
    assert x["left_eye"] > 0.5 > x["right_eye"]
    assert x["left_brow"] > x["right_brow"] and x["left_iris"] > x["right_iris"]
    for side in ("left", "right"):
        eye = kp[keypoint_slice(f"{side}_eye"), :2]
        iris = kp[keypoint_slice(f"{side}_iris"), :2][0]
        assert eye[:, 0].min() < iris[0] < eye[:, 0].max()  # each iris sits inside its own eye
        # brows above eyes (image y grows downwards)
        assert kp[keypoint_slice(f"{side}_brow"), 1].mean() < eye[:, 1].mean()


@pytest.mark.slow
def test_head_pose_signs_on_real_frames(sample_frames):
    d3 = list_column(sample_frames("lp_d3"), "head_pose", 3)
    assert d3[223, 0] > 10  # turned toward the subject's left: yaw +
    assert d3[200, 1] < -4  # head lowered: pitch -
    assert list_column(sample_frames("edtalk_mouth"), "head_pose", 3)[179, 1] > 15  # chin up: pitch +
    assert list_column(sample_frames("tpsmm_driving"), "head_pose", 3)[136, 2] < -6  # top toward the right shoulder: roll -


@pytest.mark.slow
def test_gaze_sign_on_real_frames(sample_frames):
    g = signed_gaze(list_column(sample_frames("lp_d0"), "gaze", 4))
    assert np.median(g[12:27, 0]) > 0.3  # looking toward the subject's left
    assert np.median(g[30:40, 0]) < -0.2  # toward the subject's right
    assert np.median(g[30:40, 0]) < np.median(g[0:8, 0]) < np.median(g[12:27, 0])  # frames 0-8: near straight
