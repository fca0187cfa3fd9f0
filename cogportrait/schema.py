"""The project's fixed vocabulary and every Parquet schema, declared once.

Other modules import names from here; no other file builds a ``pa.schema``. Channel order,
keypoint indices and sign conventions follow DESIGN.md and must never be reordered: stored
tables and fitted face models depend on them.
"""

from __future__ import annotations

import uuid

import pyarrow as pa

# --------------------------------------------------------------------------------------------
# Control state c_t: 17 channels. Left/right are the subject's own.
# --------------------------------------------------------------------------------------------
CONTROL_CHANNELS: tuple[str, ...] = (
    "AU1",  # inner brow raiser
    "AU2L",  # outer brow raiser, left
    "AU2R",  # outer brow raiser, right
    "AU4L",  # brow lowerer, left
    "AU4R",  # brow lowerer, right
    "AU5",  # upper lid raiser
    "AU7",  # lid tightener
    "AU41",  # lid droop (sustained, not a blink)
    "AU45L",  # eye closure, left
    "AU45R",  # eye closure, right
    "gaze_left",
    "gaze_right",
    "gaze_up",
    "gaze_down",
    "yaw",  # degrees, + = toward the subject's left
    "pitch",  # degrees, + = chin up
    "roll",  # degrees, + = top of head toward the subject's left shoulder
)
N_CHANNELS = len(CONTROL_CHANNELS)
CHANNEL_INDEX: dict[str, int] = {name: i for i, name in enumerate(CONTROL_CHANNELS)}
AU_CHANNELS: tuple[str, ...] = CONTROL_CHANNELS[:10]
GAZE_CHANNELS: tuple[str, ...] = CONTROL_CHANNELS[10:14]
HEAD_CHANNELS: tuple[str, ...] = CONTROL_CHANNELS[14:17]
HEAD_ANGLE_SCALE_DEG = 30.0  # head angles are divided by this to share the AU/gaze scale

# Pairs swapped when a source is mirrored (yaw and roll are negated as well).
MIRROR_CHANNEL_PAIRS: tuple[tuple[str, str], ...] = (
    ("AU2L", "AU2R"),
    ("AU4L", "AU4R"),
    ("AU45L", "AU45R"),
    ("gaze_left", "gaze_right"),
)
MIRROR_NEGATED_CHANNELS: tuple[str, ...] = ("yaw", "roll")

# --------------------------------------------------------------------------------------------
# 62 eye-region keypoints: MediaPipe face-mesh indices, in this order.
# --------------------------------------------------------------------------------------------
KEYPOINT_GROUPS: dict[str, tuple[int, ...]] = {
    "left_eye": (263, 249, 390, 373, 374, 380, 381, 382, 362, 398, 384, 385, 386, 387, 388, 466),
    "right_eye": (33, 7, 163, 144, 145, 153, 154, 155, 133, 173, 157, 158, 159, 160, 161, 246),
    "left_brow": (276, 283, 282, 295, 285, 300, 293, 334, 296, 336),
    "right_brow": (46, 53, 52, 65, 55, 70, 63, 105, 66, 107),
    "left_iris": (473, 474, 475, 476, 477),  # centre first
    "right_iris": (468, 469, 470, 471, 472),  # centre first
}
KEYPOINT_INDICES: tuple[int, ...] = tuple(i for group in KEYPOINT_GROUPS.values() for i in group)
N_KEYPOINTS = len(KEYPOINT_INDICES)
N_LANDMARKS = 478
MIRROR_KEYPOINT_GROUP_PAIRS: tuple[tuple[str, str], ...] = (
    ("left_eye", "right_eye"),
    ("left_brow", "right_brow"),
    ("left_iris", "right_iris"),
)


def keypoint_slice(group: str) -> slice:
    """Position of a keypoint group inside the 62-point vector."""
    start = 0
    for name, members in KEYPOINT_GROUPS.items():
        if name == group:
            return slice(start, start + len(members))
        start += len(members)
    raise KeyError(f"unknown keypoint group {group!r}; known: {sorted(KEYPOINT_GROUPS)}")


assert N_CHANNELS == 17 and N_KEYPOINTS == 62 and len(set(KEYPOINT_INDICES)) == 62

# MediaPipe FaceLandmarker blendshape categories, in the model's output order.
BLENDSHAPE_NAMES: tuple[str, ...] = (
    "_neutral", "browDownLeft", "browDownRight", "browInnerUp", "browOuterUpLeft",
    "browOuterUpRight", "cheekPuff", "cheekSquintLeft", "cheekSquintRight", "eyeBlinkLeft",
    "eyeBlinkRight", "eyeLookDownLeft", "eyeLookDownRight", "eyeLookInLeft", "eyeLookInRight",
    "eyeLookOutLeft", "eyeLookOutRight", "eyeLookUpLeft", "eyeLookUpRight", "eyeSquintLeft",
    "eyeSquintRight", "eyeWideLeft", "eyeWideRight", "jawForward", "jawLeft", "jawOpen",
    "jawRight", "mouthClose", "mouthDimpleLeft", "mouthDimpleRight", "mouthFrownLeft",
    "mouthFrownRight", "mouthFunnel", "mouthLeft", "mouthLowerDownLeft", "mouthLowerDownRight",
    "mouthPressLeft", "mouthPressRight", "mouthPucker", "mouthRight", "mouthRollLower",
    "mouthRollUpper", "mouthShrugLower", "mouthShrugUpper", "mouthSmileLeft", "mouthSmileRight",
    "mouthStretchLeft", "mouthStretchRight", "mouthUpperUpLeft", "mouthUpperUpRight",
    "noseSneerLeft", "noseSneerRight",
)
N_BLENDSHAPES = len(BLENDSHAPE_NAMES)
AU_PROXY_NAMES: tuple[str, ...] = AU_CHANNELS  # AU41 has no blendshape proxy: NaN until invert
GAZE_PROXY_NAMES: tuple[str, ...] = GAZE_CHANNELS
HEAD_POSE_NAMES: tuple[str, ...] = HEAD_CHANNELS

# --------------------------------------------------------------------------------------------
# Normalisation (paper 4.1)
# --------------------------------------------------------------------------------------------
CLIP_FPS = 25
CLIP_SIZE = 512
AUDIO_SAMPLE_RATE = 16_000

# --------------------------------------------------------------------------------------------
# Rejects: closed vocabularies of stages and reasons.
# --------------------------------------------------------------------------------------------
REJECT_STAGES: tuple[str, ...] = (
    "manifest", "probe", "scenes", "face_track", "text", "quality", "motion", "crop",
    "extract", "invert", "prototypes", "kto", "kto_negatives",
    "generate", "evaluate",
)
REJECT_REASONS: dict[str, str] = {
    "invalid_row": "a manifest row lacks an id or path, or has an unreadable value",
    "duplicate_id": "the video_id already appeared on an earlier manifest row",
    "path_outside_root": "the path resolves outside the dataset root",
    "missing_file": "no file at the path",
    "empty_file": "the file has zero bytes",
    "undecodable": "the container or its video stream cannot be decoded",
    "no_video_stream": "the container has no video stream",
    "too_short": "shorter than the minimum clip duration",
    "no_face": "no face found in the span",
    "multi_face": "more than one face of comparable size",
    "small_face": "the face is smaller than the minimum size",
    "text_overlay": "burnt-in text or subtitles detected",
    "blurry": "face region sharpness below threshold",
    "underexposed": "face region too dark",
    "overexposed": "face region too bright",
    "static": "no motion (frozen or still frames)",
    "chaotic_motion": "face moves too fast to be a usable talking head",
    "decode_error": "decoding failed part-way through the span",
    "no_frames": "the clip decodes to zero frames",
    "no_keypoints": "a KTO sample without conditioning keypoints (kto_mine ran without frames.parquet)",
    "well_controlled": "the generated video follows its conditions: not an undesirable KTO sample",
    # cogportrait generate (a request row; missing_file, duplicate_id, no_face, too_short also apply)
    "invalid_request": "a request row lacks a usable id or reference, asks nothing (no label, no instruction), gives both a duration and an audio, or a non-positive duration",
    "no_length": "a request gives neither a duration nor an audio file: nothing sets its length",
    "unreadable_image": "the reference portrait is not a readable image",
    "unreadable_audio": "the audio file cannot be decoded",
    "unknown_label": "the label is not a known category (rules backend)",
    "unreadable_instruction": "the instruction grammar cannot read an instruction",
    "unplannable": "the planner cannot honour the request (e.g. an instruction timed past the end)",
    "unalignable": "the compiled keypoints cannot be warped onto the portrait's detected face",
    # cogportrait evaluate videos (a generated or reference video; decode_error, no_frames, no_face also apply)
    "no_reference": "a generated video has no reference video of the same name",
    "not_generated": "a reference video (or an annotated case) has no generated video of the same name",
}
REJECT_REASON_NAMES: tuple[str, ...] = tuple(REJECT_REASONS)

# What the curate text filter saw in the top and bottom bands of a span (``text_kind``), least
# to most intrusive; only the last two are rejected (``text_overlay``).
TEXT_KINDS: dict[str, str] = {
    "none": "no text line in the bands outside the face",
    "static": "text at a fixed place, the same in every sample: a logo, a static name plate, still scene text",
    "scene": "text that moves with the picture, or comes and goes in too few samples to be a caption",
    "caption": "text lines replaced in place between samples (subtitles), in enough samples",
    "ticker": "a caption line spanning most of the width: scrolling text",
}
TEXT_KIND_NAMES: tuple[str, ...] = tuple(TEXT_KINDS)


class TableError(ValueError):
    """An input table a stage cannot use as given (missing columns, duplicate keys, no rows): the
    user's data, not a bug, so the command line reports it in one line."""


def check_reason(stage: str, reason: str) -> None:
    """Fail loudly on a reason or stage outside the closed vocabulary."""
    if stage not in REJECT_STAGES:
        raise ValueError(f"unknown reject stage {stage!r}; valid: {', '.join(REJECT_STAGES)}")
    if reason not in REJECT_REASONS:
        raise ValueError(f"unknown reject reason {reason!r}; valid: {', '.join(REJECT_REASON_NAMES)}")


# --------------------------------------------------------------------------------------------
# Deterministic ids
# --------------------------------------------------------------------------------------------
ID_NAMESPACE = uuid.UUID("6f0c1b1e-7d3a-5b9e-9a53-0c0a9e1f2d10")


def make_id(kind: str, *parts: object) -> str:
    """uuid5 of a kind and the parts that identify a row; reruns give the same id."""
    return str(uuid.uuid5(ID_NAMESPACE, kind + ":" + "|".join(str(p) for p in parts)))


def clip_id_for(video_id: str, start_frame: int, end_frame: int) -> str:
    return make_id("clip", video_id, start_frame, end_frame)


UNKNOWN_IDENTITY = "unknown"  # the manifest's identity when none is given


def identity_key(identity: str | None, clip_id: str) -> str:
    """The key that groups clips of one person: face-model baselines, prototypes, KTO splits.

    A clip without a stated identity is its own identity, never its video's: an unlabelled video
    may show several people (the sample's multi-shot edit shows five), while a clip is one shot
    with one tracked face. Every stage keys identities through this function.
    """
    return identity if identity and identity != UNKNOWN_IDENTITY else f"clip:{clip_id}"


# --------------------------------------------------------------------------------------------
# Arrow schemas
# --------------------------------------------------------------------------------------------
def _f32_list(n: int | None = None) -> pa.DataType:
    return pa.list_(pa.float32(), n) if n is not None else pa.list_(pa.float32())


CURATE_STEP_TIMERS = ("t_probe", "t_scenes", "t_track", "t_text", "t_filter", "t_crop")  # seconds per step, per row
_STR, _F64, _I64, _BOOL = pa.string(), pa.float64(), pa.int64(), pa.bool_()
# The rows between curate's Ray steps (cogportrait/curate/steps.py, same key order as its
# ROW_DEFAULTS): one video, then one span of it, every key with one declared type.
CURATE_ROW_SCHEMA = pa.schema(
    [
        ("video_id", _STR), ("path", _STR), ("source", _STR), ("license", _STR), ("label", _STR), ("identity", _STR),
        ("mirrored", _BOOL), ("manifest_row", _I64),
        ("fps", _F64), ("width", _I64), ("height", _I64), ("codec", _STR), ("start_time_s", _F64), ("rotation", _I64),
        ("has_audio_stream", _BOOL), ("n_src_frames", _I64), ("duration_s", _F64),
        ("scene_index", _I64), ("start_frame", _I64), ("end_frame", _I64), ("start_s", _F64), ("end_s", _F64),
        ("times", pa.list_(_F64)),
        ("track_frames", pa.list_(_I64)), ("track_boxes", pa.list_(pa.list_(_F64, 4))),
        ("text_frames", pa.list_(_I64)), ("text_jpegs", pa.list_(pa.binary())),
        ("face_size_px", _F64), ("face_score", _F64), ("face_coverage", _F64),
        ("sharpness", _F64), ("brightness", _F64), ("motion_score", _F64), ("head_speed", _F64), ("text_score", _F64),
        ("text_kind", _STR),
        ("clip_id", _STR), ("clip_path", _STR), ("audio_path", _STR), ("has_audio", _BOOL), ("n_frames", _I64),
        ("crop_box", pa.list_(pa.float32())), ("crop_track", pa.list_(pa.list_(pa.float32(), 3))),
        ("reject_stage", _STR), ("reject_reason", _STR), ("reject_detail", _STR),
        ("video_rows", _I64),
        *((name, _F64) for name in CURATE_STEP_TIMERS),
    ]
)

VIDEOS_SCHEMA = pa.schema(
    [
        pa.field("video_id", pa.string(), nullable=False),
        pa.field("path", pa.string(), nullable=False),
        pa.field("source", pa.string()),
        pa.field("license", pa.string()),
        pa.field("label", pa.string()),
        pa.field("identity", pa.string()),
        pa.field("mirrored", pa.bool_()),
        pa.field("manifest_row", pa.int32()),
    ]
)
MANIFEST_REQUIRED_COLUMNS: tuple[str, ...] = ("video_id", "path", "source", "license", "label")
MANIFEST_OPTIONAL_COLUMNS: dict[str, object] = {"identity": UNKNOWN_IDENTITY, "mirrored": False}

CLIPS_SCHEMA = pa.schema(
    [
        pa.field("clip_id", pa.string(), nullable=False),
        pa.field("video_id", pa.string(), nullable=False),
        pa.field("clip_path", pa.string(), nullable=False),  # relative to the table's folder
        pa.field("audio_path", pa.string()),  # relative; null when the source has no audio
        pa.field("has_audio", pa.bool_()),
        pa.field("start_s", pa.float64()),  # seconds in the source video
        pa.field("end_s", pa.float64()),
        pa.field("start_frame", pa.int64()),  # source frames, end exclusive
        pa.field("end_frame", pa.int64()),
        pa.field("fps", pa.float64()),  # of the source
        pa.field("n_frames", pa.int32()),  # frames in the 25 fps clip
        pa.field("scene_index", pa.int32()),
        pa.field("crop_box", _f32_list(4)),  # median x0, y0, x1, y1 in source pixels
        pa.field("crop_track", pa.list_(_f32_list(3))),  # per clip frame: cx, cy, side (source px)
        pa.field("source_width", pa.int32()),
        pa.field("source_height", pa.int32()),
        pa.field("label", pa.string()),
        pa.field("identity", pa.string()),
        pa.field("mirrored", pa.bool_()),
        pa.field("source", pa.string()),
        pa.field("license", pa.string()),
        # filter scores
        pa.field("face_size_px", pa.float32()),
        pa.field("face_score", pa.float32()),
        pa.field("face_coverage", pa.float32()),  # share of sampled frames with the face found
        pa.field("text_score", pa.float32()),  # share of the frame covered by text lines in the bands
        pa.field("text_kind", pa.string()),  # TEXT_KINDS
        pa.field("sharpness", pa.float32()),
        pa.field("brightness", pa.float32()),
        pa.field("motion_score", pa.float32()),
        pa.field("head_speed", pa.float32()),
    ]
)

REJECTS_SCHEMA = pa.schema(
    [
        pa.field("video_id", pa.string()),  # the input id (clip_id for later stages' inputs)
        pa.field("stage", pa.string(), nullable=False),
        pa.field("reason", pa.string(), nullable=False),
        pa.field("detail", pa.string()),
        pa.field("manifest_row", pa.int32()),
        pa.field("path", pa.string()),
        pa.field("scene_index", pa.int32()),
        pa.field("start_s", pa.float64()),  # null when the whole input was rejected
        pa.field("end_s", pa.float64()),
        pa.field("start_frame", pa.int64()),
        pa.field("end_frame", pa.int64()),
    ]
)

FRAMES_SCHEMA = pa.schema(
    [
        pa.field("clip_id", pa.string(), nullable=False),
        pa.field("frame", pa.int32(), nullable=False),  # 0-based at 25 fps
        pa.field("face_present", pa.bool_(), nullable=False),
        pa.field("face_score", pa.float32()),
        pa.field("landmarks", _f32_list(N_LANDMARKS * 3)),  # normalised x, y, z
        pa.field("blendshapes", _f32_list(N_BLENDSHAPES)),
        pa.field("transform", _f32_list(16)),  # 4x4 row-major facial transformation matrix
        pa.field("keypoints", _f32_list(N_KEYPOINTS * 3)),  # 62x3 in the 512 crop, [0, 1]
        pa.field("au", _f32_list(len(AU_PROXY_NAMES))),
        pa.field("gaze", _f32_list(len(GAZE_PROXY_NAMES))),
        pa.field("head_pose", _f32_list(3)),  # yaw, pitch, roll in degrees
        pa.field("width", pa.int32()),  # clip frame size: landmarks -> pixel units
        pa.field("height", pa.int32()),
    ]
)

CONTROLS_SCHEMA = pa.schema(
    [
        pa.field("clip_id", pa.string(), nullable=False),
        pa.field("frame", pa.int32(), nullable=False),
        pa.field("face_present", pa.bool_()),
        pa.field("controls", _f32_list(N_CHANNELS)),
        pa.field("residual_error", pa.float32()),  # mean keypoint error in IOD units
    ]
)

FLAME_FITS_SCHEMA = pa.schema(
    [
        pa.field("clip_id", pa.string(), nullable=False),
        pa.field("frame", pa.int32(), nullable=False),
        pa.field("expression", _f32_list()),  # FLAME expression coefficients (null where no face)
        pa.field("eye_pose", _f32_list(6)),  # left, right eye axis-angle (radians)
        pa.field("residual", pa.float32()),  # mean keypoint distance, IOD units
    ]
)

EVENT_TYPES: tuple[str, ...] = (
    "blink", "prolonged_closure", "wink", "brow_raise", "frown", "squint", "lid_droop",
    "saccade", "fixation", "head_nod", "head_turn", "head_tilt",
)
EYE_CLOSURE_EVENTS: tuple[str, ...] = ("blink", "prolonged_closure", "wink")
EVENTS_SCHEMA = pa.schema(
    [
        pa.field("clip_id", pa.string(), nullable=False),
        pa.field("event_type", pa.string(), nullable=False),
        pa.field("start_frame", pa.int32()),
        pa.field("end_frame", pa.int32()),  # inclusive
        pa.field("apex_frame", pa.int32()),
        pa.field("eyes", pa.string()),  # both / left / right / "" when not an eye event
        pa.field("peak", pa.float32()),
        pa.field("amplitude", pa.float32()),
    ]
)

PROTOTYPES_SCHEMA = pa.schema(
    [
        pa.field("prototype_id", pa.string(), nullable=False),
        pa.field("label", pa.string()),
        pa.field("event_type", pa.string()),  # "window" for clip-level windows
        pa.field("clip_id", pa.string()),
        pa.field("video_id", pa.string()),
        pa.field("identity", pa.string()),
        pa.field("start_frame", pa.int32()),  # clip frames at 25 fps
        pa.field("end_frame", pa.int32()),  # exclusive: T = end_frame - start_frame
        pa.field("T", pa.int32()),
        pa.field("controls", pa.list_(_f32_list(N_CHANNELS))),  # T x 17
        pa.field("keypoints", pa.list_(_f32_list(N_KEYPOINTS * 2))),  # T x 62 x 2
        pa.field("channel_mean", _f32_list(N_CHANNELS)),
        # per-channel peak: the max for AU/gaze; for head angles the signed value of largest |angle|
        pa.field("channel_max", _f32_list(N_CHANNELS)),
        pa.field("face_coverage", pa.float32()),
        pa.field("mean_residual_error", pa.float32()),
        pa.field("quality_flags", pa.list_(pa.string())),  # see PROTOTYPE_QUALITY_FLAGS
    ]
    # The same statistics as flat columns (mean_AU45L, peak_pitch, ...): filters in polars/DuckDB
    # read one float column instead of decoding the fixed-size lists (5x faster at 1e6 rows).
    + [pa.field(f"{stat}_{name}", pa.float32()) for stat in ("mean", "peak") for name in CONTROL_CHANNELS]
)
# Derived from channel_mean / channel_max when the table is written (prototype_store), nowhere else.
PROTOTYPE_FLAT_STAT_COLUMNS: tuple[str, ...] = tuple(f"{stat}_{name}" for stat in ("mean", "peak") for name in CONTROL_CHANNELS)
# Rows of the prototypes job before the driver splits them: every candidate span of a clip, the
# dropped ones (too short, too little face, a duplicate) with their reason and no arrays.
PROTOTYPE_DROP_REASONS: tuple[str, ...] = ("short", "low_face_coverage", "duplicate")
PROTOTYPE_CANDIDATES_SCHEMA = PROTOTYPES_SCHEMA.append(pa.field("drop_reason", pa.string()))

PROTOTYPE_QUALITY_FLAGS: dict[str, str] = {
    "face_gaps": "some frames had no face; their controls and keypoints are interpolated",
    "high_residual": "mean inversion residual above prototypes.max_residual_error",
    "truncated": "the event was longer than prototypes.max_event_s and was cut around its apex",
    "clipped_context": "the clip edge cut the context padding",
    "no_keypoints": "frames.parquet had no keypoints for the span; keypoints are zeros",
}
PROTOTYPE_WINDOW_EVENT = "window"  # event_type of clip-level windows
PROTOTYPE_EVENT_TYPES: tuple[str, ...] = EVENT_TYPES + (PROTOTYPE_WINDOW_EVENT,)  # what a prototype row can be

KTO_CATEGORIES: tuple[str, ...] = (
    "large_head_motion", "asymmetric_brow", "erratic_gaze", "rapid_blink",
)
KTO_SCHEMA = pa.schema(
    [
        pa.field("sample_id", pa.string(), nullable=False),
        pa.field("category", pa.string(), nullable=False),
        pa.field("desirable", pa.bool_(), nullable=False),
        pa.field("split", pa.string()),  # train / test, by identity
        pa.field("clip_id", pa.string()),
        pa.field("identity", pa.string()),
        pa.field("start_frame", pa.int32()),
        pa.field("end_frame", pa.int32()),
        pa.field("reference_frame", pa.int32()),
        pa.field("audio_path", pa.string()),
        pa.field("audio_start_s", pa.float64()),
        pa.field("audio_end_s", pa.float64()),
        pa.field("keypoints", pa.list_(_f32_list(N_KEYPOINTS * 2))),
        pa.field("prompt", pa.string()),
        pa.field("video_path", pa.string()),
        pa.field("score", pa.float32()),
    ]
)

# Undesirable KTO samples (`cogportrait kto negatives`): KTO_SCHEMA's columns first (one loader reads
# both tables; video_path is the generated mp4, whose frame i is window frame i), then the scores.
KTO_NEGATIVE_REASONS: dict[str, str] = {  # why a generated video was kept, checked in this order
    "no_face": "too few generated frames with a face found by the extract stage's landmarker",
    "eye_lmd": "the re-extracted eye-region keypoints stray from the conditioning keypoints",
    "criterion": "the category's own behaviour (head angle, brow asymmetry, gaze shifts, blinks) is not reproduced",
}
KTO_NEGATIVES_SCHEMA = pa.schema(
    list(KTO_SCHEMA)
    + [
        pa.field("source_sample_id", pa.string(), nullable=False),  # the desirable row whose conditions were used
        pa.field("checkpoint_sha256", pa.string(), nullable=False),
        pa.field("seed", pa.int64(), nullable=False),
        pa.field("face_ratio", pa.float32()),  # share of generated frames (after the reference slot) with a face
        pa.field("eye_lmd", pa.float32()),  # null when no generated frame has a face
        pa.field("criterion", pa.string()),  # the category's measure, e.g. blink_count
        pa.field("criterion_value", pa.float32()),  # measured on the generated video (null without a face)
        pa.field("criterion_target", pa.float32()),  # the same measure on the real window (null when unmeasurable)
        pa.field("identity_sim", pa.float32()),  # null: no identity backend installed
        pa.field("reason", pa.string(), nullable=False),  # KTO_NEGATIVE_REASONS
    ]
)
# Rows of the job before the driver splits them: every candidate, a rejected one with its reason.
KTO_NEGATIVE_CANDIDATES_SCHEMA = pa.schema(
    [f.with_nullable(True) for f in KTO_NEGATIVES_SCHEMA]
    + [
        pa.field("source_video_path", pa.string()),  # the real clip (the reference frame's source)
        pa.field("mirrored", pa.bool_()),
        pa.field("reject_reason", pa.string()),  # REJECT_REASONS; null when kept
        pa.field("reject_detail", pa.string()),
        pa.field("t_generate", pa.float64()),  # seconds per step, per row (metrics only)
        pa.field("t_score", pa.float64()),
    ]
)

# Stage 1 outputs (cogportrait compile): one row per frame of the compiled sequence.
COMPILED_CONTROLS_SCHEMA = pa.schema(
    [
        pa.field("frame", pa.int32(), nullable=False),
        pa.field("time_s", pa.float64()),
        pa.field("event_index", pa.int32()),  # the plan event holding the frame
        pa.field("controls", _f32_list(N_CHANNELS)),  # head angles absolute degrees (the portrait's pose at frame 0)
    ]
)
COMPILED_KEYPOINTS_SCHEMA = pa.schema(
    [
        pa.field("frame", pa.int32(), nullable=False),
        pa.field("time_s", pa.float64()),
        pa.field("keypoints", _f32_list(N_KEYPOINTS * 3)),  # 62 x (x, y, z): x, y in [0, 1] of the crop, y down
    ]
)

# Batch generation (`cogportrait generate`): the requests table (paths relative to its folder) and
# one metadata row per generated video. label, instruction, audio and duration_s may be null where
# another gives the length: exactly one of duration_s and audio sets it; a label, an instruction or both.
GENERATE_REQUESTS_SCHEMA = pa.schema(
    [
        pa.field("request_id", pa.string(), nullable=False),  # unique; names the output folder requests/<request_id>/
        pa.field("label", pa.string()),
        pa.field("instruction", pa.string()),
        pa.field("reference", pa.string()),  # portrait image (required)
        pa.field("audio", pa.string()),  # wav: muxed, conditions Stage 2, and its length sets the frames
        pa.field("prompt", pa.string()),  # null: the training config's template with the label
        pa.field("seed", pa.int64()),  # Stage 1 and Stage 2 seed; null: 0
        pa.field("duration_s", pa.float64()),
    ]
)
GENERATED_SCHEMA = pa.schema(
    [
        pa.field("request_id", pa.string(), nullable=False),
        pa.field("output_id", pa.string(), nullable=False),  # make_id of the request's content and the settings
        pa.field("video_path", pa.string(), nullable=False),  # relative to the out folder
        pa.field("stage1_dir", pa.string(), nullable=False),  # relative: keypoints.parquet, plan, critic, preview, ...
        pa.field("reference", pa.string(), nullable=False),  # as the request gave it
        pa.field("audio", pa.string()),
        pa.field("label", pa.string()),  # the canonical category (null: instructions alone)
        pa.field("instruction", pa.string()),
        pa.field("prompt", pa.string(), nullable=False),  # the prompt used
        pa.field("seed", pa.int64(), nullable=False),
        pa.field("frames", pa.int32(), nullable=False),
        pa.field("critic_approved", pa.bool_()),
        pa.field("checkpoint", pa.string()),  # null: the training config's own weights
        pa.field("weights_sha256", pa.string(), nullable=False),
        pa.field("sample_steps", pa.int32(), nullable=False),
        pa.field("device", pa.string(), nullable=False),
        pa.field("stage1_s", pa.float64()),  # wall seconds of this request's Stage 1 (reference read, compile, files)
        pa.field("stage2_s", pa.float64()),  # ... and of its Stage 2 (sampling, decode, mp4)
    ]
)
# Rows between the driver and the generating actors: the request with its resolved paths, then
# either a GENERATED row's values or a reject.
GENERATE_TASK_SCHEMA = GENERATE_REQUESTS_SCHEMA.append(pa.field("row", pa.int32())).append(
    pa.field("output_id", pa.string())).append(pa.field("reference_path", pa.string())).append(pa.field("audio_path", pa.string()))
GENERATE_RESULT_SCHEMA = pa.schema(
    [f.with_nullable(True) for f in GENERATED_SCHEMA]
    + [
        pa.field("row", pa.int32()),
        pa.field("reject_reason", pa.string()),  # REJECT_REASONS; null when generated
        pa.field("reject_detail", pa.string()),
        pa.field("reject_path", pa.string()),
    ]
)

TABLE_SCHEMAS: dict[str, pa.Schema] = {
    "videos": VIDEOS_SCHEMA,
    "clips": CLIPS_SCHEMA,
    "rejects": REJECTS_SCHEMA,
    "frames": FRAMES_SCHEMA,
    "controls": CONTROLS_SCHEMA,
    "events": EVENTS_SCHEMA,
    "flame_fits": FLAME_FITS_SCHEMA,
    "prototypes": PROTOTYPES_SCHEMA,
    "kto": KTO_SCHEMA,
    "kto_negatives": KTO_NEGATIVES_SCHEMA,
    "compiled_controls": COMPILED_CONTROLS_SCHEMA,
    "compiled_keypoints": COMPILED_KEYPOINTS_SCHEMA,
    "generate_requests": GENERATE_REQUESTS_SCHEMA,
    "generated": GENERATED_SCHEMA,
}
