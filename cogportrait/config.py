"""Typed configuration for every stage, loaded from one section of ``params.yaml``.

Validation names the valid choices, so a typo in params.yaml fails before any work starts.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import yaml

T = TypeVar("T")

SCENE_DETECTORS = ("adaptive", "content")
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
    scene_downscale_px: int = 256  # frames are shrunk to this width before scene detection
    # face tracking
    track_fps: float = 5.0
    face_min_confidence: float = 0.5
    min_face_px: float = 96.0  # face box side, source pixels
    multi_face_area_ratio: float = 0.2  # a second face at least this share of the largest's area
    max_face_gap_s: float = 1.0  # longer gaps split the span
    # text / subtitle filter
    text_frames: int = 3
    text_det_side_px: int = 512
    text_min_box_height: float = 0.02  # of frame height; smaller detections are texture, not text
    text_max_area: float = 0.002  # share of the frame covered by text outside the face
    text_min_frames_ratio: float = 0.5  # share of sampled frames that must show text to reject
    # quality
    min_sharpness: float = 40.0  # variance of the Laplacian of the 128² grey face crop
    min_brightness: float = 40.0  # mean luma of the face box, 0-255
    max_brightness: float = 225.0
    # motion
    min_motion: float = 0.002  # mean abs change of the 32² face thumbnail between samples
    max_head_speed: float = 2.0  # face-box centre speed, face sides per second (90th pct)
    # crop and encode
    crop_scale: float = 1.5
    crop_smooth_s: float = 0.5
    encode_preset: str = "veryfast"
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
        _check_range("text_min_frames_ratio", self.text_min_frames_ratio, 0.0, 1.0)
        _check_range("crop_scale", self.crop_scale, 1.0, 4.0)
        _check_range("encode_crf", self.encode_crf, 0, 51)
        _check_range("num_workers", self.num_workers, 1)
        if self.min_brightness >= self.max_brightness:
            raise ConfigError("min_brightness must be below max_brightness")


def from_mapping(cls: type[T], values: dict[str, Any] | None, section: str = "") -> T:
    """Build a config dataclass, refusing unknown keys with the list of known ones."""
    values = dict(values or {})
    known = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise ConfigError(
            f"unknown key(s) {unknown} in params section {section or cls.__name__}; "
            f"known: {', '.join(sorted(known))}"
        )
    for key, f in known.items():
        if key in values and isinstance(f.default, float) and isinstance(values[key], int):
            values[key] = float(values[key])
    return cls(**values)


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


STAGE_CONFIGS: dict[str, type] = {"curate": CurateConfig}
__all__ = ["ConfigError", "CurateConfig", "STAGE_CONFIGS", "from_mapping", "load_params", "load_section", "field"]
