"""Reading the reference portrait of Stage 1 (real photos from datasets/sample/images)."""

from __future__ import annotations

import logging

import numpy as np
import pytest

from cogportrait.face.mapping import Placement, pose_and_project
from cogportrait.face.pose import RIGID_ANCHORS, rotation_from_head_pose
from cogportrait.face.reference import (
    Reference,
    ReferencePortraitError,
    ReferenceReader,
    neutral_reference,
    read_reference,
)
from cogportrait.schema import KEYPOINT_GROUPS, KEYPOINT_INDICES, N_KEYPOINTS

from conftest import SAMPLE

SINGLE = SAMPLE / "images" / "pyfeat_single_face.jpg"
GROUP = SAMPLE / "images" / "insightface_t1_group.jpg"


@pytest.fixture(scope="module")
def reader():
    with ReferenceReader() as r:
        yield r


@pytest.fixture(scope="module")
def single() -> Reference:
    return read_reference(SINGLE)  # the public one-call API, models loaded and closed inside


def _check_placement_by_hand(ref: Reference) -> None:
    """centre_px and iod_px recomputed from the raw landmarks with the pixel convention spelled out."""
    h, w = ref.image.shape[:2]
    lm = ref.landmarks
    px = np.stack([lm[:, 0] * w, -lm[:, 1] * h, -lm[:, 2] * w], axis=1)  # x·W, −y·H, −z·W
    assert np.allclose(ref.placement.centre_px, px[list(RIGID_ANCHORS)].mean(axis=0))
    left = px[list(KEYPOINT_GROUPS["left_eye"])].mean(axis=0)
    right = px[list(KEYPOINT_GROUPS["right_eye"])].mean(axis=0)
    assert ref.placement.iod_px == pytest.approx(float(np.linalg.norm(left - right)))
    assert (ref.placement.width, ref.placement.height) == (w, h)
    assert np.allclose(ref.keypoints, lm[list(KEYPOINT_INDICES)])


def _check_projection_round_trip(ref: Reference) -> None:
    """Π's projection of the portrait's own canonical keypoints at its pose lands on the measured ones."""
    assert np.allclose(rotation_from_head_pose(ref.head_pose), ref.rotation, atol=1e-9)
    back = pose_and_project(ref.canonical_keypoints()[None], ref.head_pose[None], ref.placement)[0]
    assert back.shape == (N_KEYPOINTS, 3)
    assert np.abs(back - ref.keypoints).max() < 1e-9


def test_frontal_portrait(single):
    ref = single
    assert ref.has_face and ref.path == str(SINGLE)
    assert ref.image.dtype == np.uint8 and ref.image.shape == (562, 572, 3)
    yaw, pitch, roll = ref.head_pose
    assert abs(yaw) < 15 and abs(pitch) < 15 and abs(roll) < 10
    _check_placement_by_hand(ref)
    _check_projection_round_trip(ref)
    # the subject's left eye shows on the image's right; the face sits in the picture
    left_x = ref.keypoints[list(range(16)), 0].mean()
    right_x = ref.keypoints[list(range(16, 32)), 0].mean()
    assert left_x > right_x
    assert 0.08 < ref.placement.iod_px / ref.placement.width < 0.3
    assert 0 < ref.placement.centre_px[0] < ref.placement.width and -ref.placement.height < ref.placement.centre_px[1] < 0


def test_group_photo_uses_the_largest_face_with_a_warning(reader, caplog):
    caplog.set_level(logging.WARNING, logger="cogportrait")
    ref = reader.read(GROUP)
    assert "faces in the reference portrait" in caplog.text and "using the largest" in caplog.text
    # six people, ~100-120 px faces; the largest is the standing man at the top right (x 880-1000, y 77-200)
    eyes = ref.keypoints[:32, :2] * [ref.placement.width, ref.placement.height]
    cx, cy = eyes.mean(axis=0)
    assert 860 < cx < 1010 and 70 < cy < 200
    _check_placement_by_hand(ref)
    _check_projection_round_trip(ref)  # a turned head: the pose and placement still agree
    assert ref.head_pose[0] < -20  # he looks toward his right (image left)


def test_no_face(reader, tmp_path):
    from PIL import Image

    blank = tmp_path / "blank.png"
    Image.fromarray(np.full((240, 320, 3), 200, np.uint8)).save(blank)
    with pytest.raises(ReferencePortraitError, match=r"^no face found in the reference portrait .*blank\.png$"):
        reader.read(blank)


def test_unreadable_files(tmp_path):
    missing = tmp_path / "nowhere.jpg"
    with pytest.raises(ReferencePortraitError, match=r"^cannot read reference image .*nowhere\.jpg: ") as err:
        read_reference(missing)
    assert "\n" not in str(err.value)
    text = tmp_path / "notes.jpg"
    text.write_text("not an image\n")
    with pytest.raises(ReferencePortraitError, match=r"^cannot read reference image .*notes\.jpg: ") as err:
        read_reference(text)
    assert "\n" not in str(err.value)
    with pytest.raises(ReferencePortraitError, match="cannot read reference image"):
        read_reference(tmp_path)  # a folder


def test_error_class():
    assert issubclass(ReferencePortraitError, ValueError)


def test_neutral_reference():
    ref = neutral_reference()
    assert ref.image.shape == (512, 512, 3) and ref.image.dtype == np.uint8
    assert np.all(ref.image == ref.image[0, 0])
    assert ref.placement == Placement()
    assert np.array_equal(ref.head_pose, np.zeros(3))
    assert not ref.has_face
    with pytest.raises(ValueError):
        ref.canonical_keypoints()
    half = neutral_reference(256)
    assert (half.placement.width, half.placement.height) == (256, 256)
    assert half.placement.iod_px == pytest.approx(Placement().iod_px / 2)
    assert np.allclose(half.placement.centre_px, np.array(Placement().centre_px) / 2)
