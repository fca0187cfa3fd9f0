"""Recipe: fine-tune PortraitDiT with flow matching on Ray Train (DDP), resumable, safetensors checkpoints.

    cogportrait train --config training/configs/tiny.yaml [--set train.steps=20] [--fresh]

Shape (torchtune's): ``FlowMatchingRecipe`` runs inside each Ray Train worker with
``setup`` (model, optimizer, resume) -> ``train`` (one optimizer step per batch of the streamed
dataset shard) -> ``cleanup``; ``launch`` runs on the driver: it plans the windows, builds the Ray
Data stream from the resume position on and starts the ``TorchTrainer``.

Determinism, which makes resume exact: the data order is a function of (seed, position)
(``training/data.py: window_positions``) and each step's noise, timesteps and condition dropout come
from a generator seeded by (seed, the step's first data position), so an interrupted run resumed
from its latest checkpoint continues the same loss curve.
"""

from __future__ import annotations

import csv
import io
import logging
import math
import time
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np
import ray
import ray.train
import torch
from ray.train import RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer

from cogportrait.io.atomic import atomic_path, write_json
from training.checkpoint import TrainerState, latest_checkpoint, load_checkpoint, read_state, save_checkpoint
from training.conditioning import Stage2Batch, encode_batch
from training.config import Stage2Config, resolve_paths
from training.data import SampleLoader, plan_windows, window_positions
from training.errors import TrainingDataError
from training.model import Stage2Model, build_stage2_model, check_model_folders
from training.objective import draw_noise, flow_matching_errors, step_generator

log = logging.getLogger("cogportrait")
LOSS_FILE = "loss.csv"  # DVC plot: step, loss
METRICS_FILE = "metrics.json"  # DVC metric


class FlowMatchingRecipe:
    """One Ray Train worker's training: setup -> train -> cleanup."""

    def __init__(self, cfg: Stage2Config):
        self.cfg = cfg
        self.out = Path(cfg.train.out)
        self.cache: OrderedDict[str, Stage2Batch] = OrderedDict()  # frozen-encoder outputs per sample id

    # -- setup ------------------------------------------------------------------------------------
    def setup(self) -> None:
        import ray.train.torch as rtt

        cfg = self.cfg
        ctx = ray.train.get_context()
        self.rank, self.world = ctx.get_world_rank(), ctx.get_world_size()
        self.device = rtt.get_device()
        self.model: Stage2Model = build_stage2_model(cfg.model)
        frozen_dtype = torch.bfloat16 if cfg.train.mixed_precision == "bf16" else None
        self.model.to(self.device, frozen_dtype)
        self.optimizer = torch.optim.AdamW([p for p in self.model.dit.parameters() if p.requires_grad],
                                           lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
        self.state = TrainerState()
        resume = latest_checkpoint(self.out / "checkpoints")
        if resume is not None:
            self.state = load_checkpoint(resume, self.model.dit, self.optimizer)
            if self.rank == 0:
                log.info("resumed from %s (step %d, position %d)", resume, self.state.step, self.state.position)
        self.dit = rtt.prepare_model(self.model.dit)  # DDP when world > 1
        self.null_text = self.model.text([cfg.sample.negative_prompt])
        self.seq_len: int | None = None

    # -- one step ---------------------------------------------------------------------------------
    def encode(self, batch: dict[str, np.ndarray]) -> Stage2Batch:
        """The batch's frozen-encoder outputs, from the cache where the sample was seen before."""
        parts = []
        for i, sample_id in enumerate(batch["sample_id"]):
            hit = self.cache.get(sample_id)
            if hit is None:
                hit = encode_batch(self.model, batch["reference"][i:i + 1], batch["keypoints"][i:i + 1], batch["audio"][i:i + 1],
                                   [str(batch["prompt"][i])], batch["video"][i:i + 1]).to("cpu")
                self.cache[sample_id] = hit
                if len(self.cache) > self.cfg.train.encoder_cache:
                    self.cache.popitem(last=False)
            parts.append(hit)
        return Stage2Batch(*(torch.cat([getattr(p, f) for p in parts]) for f in ("latents", "pose_latents", "text_states", "audio_states"))).to(self.device)

    def step(self, batch: dict[str, np.ndarray]) -> float:
        cfg = self.cfg
        encoded = self.encode(batch)
        generator = step_generator(cfg.train.seed, int(batch["position"][0]))
        draw = draw_noise(tuple(encoded.latents.shape), cfg.flow, cfg.train, generator)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=cfg.train.mixed_precision == "bf16"):
            loss = flow_matching_errors(self.dit, encoded, draw, self.null_text).mean()
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.train.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.dit.parameters(), cfg.train.grad_clip)
        self.optimizer.step()
        value = loss.detach()
        if self.world > 1:
            torch.distributed.all_reduce(value, op=torch.distributed.ReduceOp.AVG)
        _, _, f, h, w = encoded.latents.shape
        self.seq_len = f * (h // self.model.dit.patch_size[1]) * (w // self.model.dit.patch_size[2])
        return float(value)

    # -- loop -------------------------------------------------------------------------------------
    def train(self) -> None:
        cfg = self.cfg
        shard = ray.train.get_dataset_shard("train")
        per_step = cfg.train.batch_size * self.world
        for batch in shard.iter_batches(batch_size=cfg.train.batch_size, batch_format="numpy", drop_last=True):
            if self.state.step >= cfg.train.steps:
                break
            t0 = time.perf_counter()
            loss = self.step(batch)
            dt = time.perf_counter() - t0
            self.state.step += 1
            self.state.position += per_step
            self.state.losses.append(loss)
            metrics = {"step": self.state.step, "loss": loss, "step_s": dt, "samples_per_s": per_step / dt,
                       "tokens_per_s": per_step * (self.seq_len or 0) / dt}
            if self.rank == 0:
                log.info("step %d/%d loss %.5f (%.2f s)", self.state.step, cfg.train.steps, loss, dt)
                if self.state.step % cfg.train.checkpoint_every == 0 or self.state.step == cfg.train.steps:
                    save_checkpoint(self.out / "checkpoints", self.model.dit, self.optimizer, self.state, cfg.train.keep_checkpoints)
                    self.write_logs(metrics)  # with the checkpoint: the curve never runs ahead of what a resume restores
            ray.train.report(metrics)

    def write_logs(self, last: dict[str, float]) -> None:
        """The loss curve (``loss.csv``, a DVC plot) and the run's summary (``metrics.json``), atomically."""
        buf = io.StringIO()
        writer = csv.writer(buf)
        writer.writerow(["step", "loss"])
        writer.writerows([i + 1, f"{v:.6g}"] for i, v in enumerate(self.state.losses))
        with atomic_path(self.out / LOSS_FILE, ".csv") as tmp:
            tmp.write_text(buf.getvalue())
        first = float(np.mean(self.state.losses[:5]))
        final = float(np.mean(self.state.losses[-5:]))
        write_json(self.out / METRICS_FILE, {"step": self.state.step, "loss": last["loss"], "loss_first5": first, "loss_last5": final,
                                             "samples_per_s": last["samples_per_s"], "tokens_per_s": last["tokens_per_s"]})

    def cleanup(self) -> None:
        self.cache.clear()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def train_loop_per_worker(config: dict[str, Any]) -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    recipe = FlowMatchingRecipe(config["cfg"])
    recipe.setup()
    try:
        recipe.train()
    finally:
        recipe.cleanup()


# ------------------------------------------------------------------------------------------------
# driver
# ------------------------------------------------------------------------------------------------
def resume_position(cfg: Stage2Config) -> tuple[int, int]:
    """(step, data position) of the latest checkpoint in ``train.out``, (0, 0) for a new run."""
    latest = latest_checkpoint(Path(cfg.train.out) / "checkpoints")
    if latest is None:
        return 0, 0
    state = read_state(latest)
    return state.step, state.position


def launch(cfg: Stage2Config) -> dict[str, Any]:
    """Plan the windows, stream them from the resume position with Ray Data, train with Ray Train."""
    from ray.data import DataContext

    cfg = resolve_paths(cfg)  # workers run in their own working directory
    check_model_folders(cfg.model)
    d, t = cfg.data, cfg.train
    windows = plan_windows(d.clips, d.frames, d.n_frames, d.stride, t.seed, d.min_reference_gap)
    if d.max_windows:
        windows = windows[: d.max_windows]
    if not windows:
        raise TrainingDataError(f"no window of {d.n_frames} consecutive face frames in {d.clips} (lower data.n_frames?)")
    step, position = resume_position(cfg)
    total = t.steps * t.batch_size * t.num_workers
    if step >= t.steps:
        log.info("%s already holds step %d of %d: nothing to train", t.out, step, t.steps)
        return {"steps": step, "resumed_from": step, "windows": len(windows), "trained_steps": 0}
    rows = window_positions(windows, total, t.seed, start=position)
    DataContext.get_current().execution_options.preserve_order = True
    dataset = ray.data.from_items(rows).map(
        SampleLoader, fn_constructor_kwargs={"frames_parquet": d.frames, "resolution": d.resolution, "prompt_template": d.prompt_template},
        concurrency=1)
    out = Path(t.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    trainer = TorchTrainer(
        train_loop_per_worker, train_loop_config={"cfg": cfg},
        scaling_config=ScalingConfig(num_workers=t.num_workers, use_gpu=t.use_gpu),
        run_config=RunConfig(name="stage2", storage_path=str(out / "ray")),
        datasets={"train": dataset},
    )
    trainer.fit()
    final_step, _ = resume_position(cfg)
    losses = _read_losses(out / LOSS_FILE)
    return {"steps": final_step, "resumed_from": step, "trained_steps": final_step - step, "windows": len(windows),
            "loss_first": losses[0] if losses else math.nan, "loss_last": losses[-1] if losses else math.nan,
            "seconds": round(time.perf_counter() - t0, 1), "out": str(out)}


def _read_losses(path: Path) -> list[float]:
    if not path.is_file():
        return []
    with open(path) as fh:
        return [float(row["loss"]) for row in csv.DictReader(fh)]
