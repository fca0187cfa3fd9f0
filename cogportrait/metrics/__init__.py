"""Evaluation metrics. ``stage1``: AU-F1 (Eq. 6), AU-Temp (Eq. 7, DTW) and Eye-LMD (paper §4.1)."""

from cogportrait.metrics.stage1 import (
    Stage1Scores,
    au_activations,
    au_f1,
    au_temp,
    au_temp_per_channel,
    dtw_distance,
    dtw_total,
    eye_lmd,
    f1_from_activations,
    flat_dtw,
    rest_controls,
    score_stage1,
)

__all__ = [
    "Stage1Scores",
    "au_activations",
    "au_f1",
    "au_temp",
    "au_temp_per_channel",
    "dtw_distance",
    "dtw_total",
    "eye_lmd",
    "f1_from_activations",
    "flat_dtw",
    "rest_controls",
    "score_stage1",
]
