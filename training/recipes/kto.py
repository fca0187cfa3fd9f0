"""Recipe: KTO refinement of PortraitDiT on boundary cases (paper §3.4, Eq. 2; ``training/kto.py``).

    cogportrait train-kto --config training/configs/tiny-kto.yaml [--set train.steps=20] [--fresh]

The policy starts from ``kto.reference_checkpoint`` (a ``cogportrait train`` checkpoint) and a
frozen copy of that checkpoint is the reference model. Each step draws one noise level, noise and
condition dropout per sample and evaluates both models on it, so r = e_ref − e_θ compares them at
the same t and noise. Same shape as ``flow_matching.py``: resume, safetensors checkpoints,
``loss.csv`` with the rewards of each step (``reward_desirable``, ``reward_undesirable``, ``z_ref``).
"""

from __future__ import annotations

import copy
import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch

from training.checkpoint import latest_checkpoint, load_model_weights
from training.conditioning import Stage2Batch
from training.config import Stage2Config, resolve_paths
from training.data import KtoSampleLoader, kto_rows, window_positions
from training.errors import CheckpointError, TrainingDataError
from training.kto import kto_loss
from training.model import check_model_folders
from training.objective import NoiseDraw, flow_matching_errors
from training.recipes.base import Stage2Recipe, fit, resume_position

log = logging.getLogger("cogportrait")


class KtoRecipe(Stage2Recipe):
    """Flow-matching KTO: policy vs the frozen starting checkpoint on desirable and undesirable samples."""

    def setup(self) -> None:
        if latest_checkpoint(self.out / "checkpoints") is None:  # a new run starts from the reference's weights
            self.init_weights = self.cfg.kto.reference_checkpoint
        super().setup()
        reference = copy.deepcopy(self.model.dit)
        load_model_weights(self.cfg.kto.reference_checkpoint, reference)
        self.reference = reference.eval().requires_grad_(False)

    def loss_terms(self, encoded: Stage2Batch, draw: NoiseDraw, batch: dict[str, np.ndarray]) -> tuple[torch.Tensor, dict[str, float]]:
        k = self.cfg.kto
        desirable = torch.as_tensor(np.asarray(batch["desirable"], dtype=bool), device=encoded.latents.device)
        policy = flow_matching_errors(self.dit, encoded, draw, self.null_text)
        with torch.no_grad():
            reference = flow_matching_errors(self.reference, encoded, draw, self.null_text)
        terms = kto_loss(policy, reference, desirable, k.beta, k.lambda_desirable, k.lambda_undesirable, k.flow_weight)
        rewards = terms.reward.float()
        mean = lambda mask: float(rewards[mask].mean()) if bool(mask.any()) else float("nan")  # noqa: E731
        return terms.loss, {"kto": float(terms.kto), "flow": float(terms.flow), "z_ref": float(terms.z_ref),
                            "reward_desirable": mean(desirable), "reward_undesirable": mean(~desirable)}


def launch(cfg: Stage2Config) -> dict[str, Any]:
    """Read both preference tables, stream their samples from the resume position, refine with Ray Train."""
    cfg = resolve_paths(cfg)
    check_model_folders(cfg.model)
    k, d, t = cfg.kto, cfg.data, cfg.train
    if not k.reference_checkpoint:
        raise CheckpointError("kto.reference_checkpoint is empty: name the `cogportrait train` checkpoint to refine")
    if not (Path(k.reference_checkpoint) / "model.safetensors").is_file():
        raise CheckpointError(f"kto.reference_checkpoint {k.reference_checkpoint} holds no model.safetensors")
    for table in (k.desirable, k.undesirable):
        if not Path(table).is_file():
            raise FileNotFoundError(f"KTO table {table} does not exist (`dvc repro kto_mine` / `cogportrait kto negatives`)")
    rows = kto_rows([k.desirable, k.undesirable], k.split, d.n_frames)
    kinds = {flag: sum(r["desirable"] == flag for r in rows) for flag in (True, False)}
    if not kinds[True] or not kinds[False]:
        raise TrainingDataError(f"KTO needs desirable and undesirable samples of split {k.split} with >= {d.n_frames} frames; "
                                f"got {kinds[True]} and {kinds[False]}")
    step, position = resume_position(cfg)
    if step >= t.steps:
        log.info("%s already holds step %d of %d: nothing to train", t.out, step, t.steps)
        return {"steps": step, "resumed_from": step, "trained_steps": 0, "desirable": kinds[True], "undesirable": kinds[False]}
    stream = window_positions(rows, t.steps * t.batch_size * t.num_workers, t.seed, start=position)
    loader_kwargs = {"clips_parquet": d.clips, "resolution": d.resolution, "n_frames": d.n_frames}
    return {**fit(cfg, KtoRecipe, stream, KtoSampleLoader, loader_kwargs, step), "desirable": kinds[True], "undesirable": kinds[False]}
