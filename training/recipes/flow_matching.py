"""Recipe: fine-tune PortraitDiT with flow matching on Ray Train (DDP), resumable, safetensors checkpoints.

    cogportrait train --config training/configs/tiny.yaml [--set train.steps=20] [--fresh]

Shape (torchtune's): ``FlowMatchingRecipe`` runs inside each Ray Train worker with ``setup`` (model,
optimizer, resume) -> ``train`` (one optimizer step per batch of the streamed dataset shard) ->
``cleanup`` (``base.Stage2Recipe``); ``launch`` runs on the driver: it plans the windows and streams
them from the resume position on (``base.fit``).
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import torch

from training.conditioning import Stage2Batch
from training.config import Stage2Config, resolve_paths
from training.data import SampleLoader, plan_windows, window_positions
from training.errors import TrainingDataError
from training.model import check_model_folders
from training.objective import NoiseDraw, flow_matching_errors
from training.recipes.base import Stage2Recipe, fit, resume_position

log = logging.getLogger("cogportrait")


class FlowMatchingRecipe(Stage2Recipe):
    """The flow-matching objective (Eq. 1 in Wan's convention) with condition dropout."""

    def loss_terms(self, encoded: Stage2Batch, draw: NoiseDraw, batch: dict[str, np.ndarray]) -> tuple[torch.Tensor, dict[str, float]]:
        return flow_matching_errors(self.dit, encoded, draw, self.null_text).mean(), {}


def launch(cfg: Stage2Config) -> dict[str, Any]:
    """Plan the windows, stream them from the resume position with Ray Data, train with Ray Train."""
    cfg = resolve_paths(cfg)  # workers run in their own working directory
    check_model_folders(cfg.model)
    d, t = cfg.data, cfg.train
    windows = plan_windows(d.clips, d.frames, d.n_frames, d.stride, t.seed, d.min_reference_gap)
    if d.max_windows:
        windows = windows[: d.max_windows]
    if not windows:
        raise TrainingDataError(f"no window of {d.n_frames} consecutive face frames in {d.clips} (lower data.n_frames?)")
    step, position = resume_position(cfg)
    if step >= t.steps:
        log.info("%s already holds step %d of %d: nothing to train", t.out, step, t.steps)
        return {"steps": step, "resumed_from": step, "windows": len(windows), "trained_steps": 0}
    rows = window_positions(windows, t.steps * t.batch_size * t.num_workers, t.seed, start=position)
    loader_kwargs = {"frames_parquet": d.frames, "resolution": d.resolution, "prompt_template": d.prompt_template}
    return {**fit(cfg, FlowMatchingRecipe, rows, SampleLoader, loader_kwargs, step), "windows": len(windows)}
