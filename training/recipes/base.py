"""What every Stage 2 recipe shares: the per-worker loop (``Stage2Recipe``) and the driver that
streams rows with Ray Data into a Ray Train ``TorchTrainer`` (``fit``).

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
from training.checkpoint import TrainerState, latest_checkpoint, load_checkpoint, load_model_weights, read_state, save_checkpoint
from training.conditioning import Stage2Batch, encode_batch
from training.config import Stage2Config
from training.model import Stage2Model, build_stage2_model
from training.objective import NoiseDraw, draw_noise, step_generator

log = logging.getLogger("cogportrait")
LOSS_FILE = "loss.csv"  # DVC plot: step, loss (+ a recipe's own columns)
METRICS_FILE = "metrics.json"  # DVC metric


class Stage2Recipe:
    """One Ray Train worker's training: setup -> train -> cleanup. Subclasses give the loss
    (``loss_terms``) and may add to ``setup``; everything else (model, optimizer, resume, the
    frozen-encoder cache, logging, checkpoints) is shared."""

    def __init__(self, cfg: Stage2Config):
        self.cfg = cfg
        self.out = Path(cfg.train.out)
        self.cache: OrderedDict[str, Stage2Batch] = OrderedDict()  # frozen-encoder outputs per sample id
        self.init_weights: str | None = None  # a checkpoint a new run starts from (a resume ignores it)

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
        if resume is None and self.init_weights:
            load_model_weights(self.init_weights, self.model.dit)
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
        return Stage2Batch.concat(parts).to(self.device)

    def loss_terms(self, encoded: Stage2Batch, draw: NoiseDraw, batch: dict[str, np.ndarray]) -> tuple[torch.Tensor, dict[str, float]]:
        """The loss to minimise and any per-step numbers to log beside it."""
        raise NotImplementedError

    def step(self, batch: dict[str, np.ndarray]) -> tuple[float, dict[str, float]]:
        cfg = self.cfg
        encoded = self.encode(batch)
        generator = step_generator(cfg.train.seed, int(batch["position"][0]))
        draw = draw_noise(tuple(encoded.latents.shape), cfg.flow, cfg.train, generator)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=cfg.train.mixed_precision == "bf16"):
            loss, extras = self.loss_terms(encoded, draw, batch)
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
        return float(value), extras

    # -- loop -------------------------------------------------------------------------------------
    def train(self) -> None:
        cfg = self.cfg
        shard = ray.train.get_dataset_shard("train")
        per_step = cfg.train.batch_size * self.world
        for batch in shard.iter_batches(batch_size=cfg.train.batch_size, batch_format="numpy", drop_last=True):
            if self.state.step >= cfg.train.steps:
                break
            t0 = time.perf_counter()
            loss, extras = self.step(batch)
            dt = time.perf_counter() - t0
            self.state.step += 1
            self.state.position += per_step
            self.state.losses.append(loss)
            for name, value in extras.items():
                self.state.extras.setdefault(name, []).append(value)
            metrics = {"step": self.state.step, "loss": loss, **extras, "step_s": dt, "samples_per_s": per_step / dt,
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
        names = sorted(self.state.extras)
        writer.writerow(["step", "loss", *names])
        for i, v in enumerate(self.state.losses):
            writer.writerow([i + 1, f"{v:.6g}", *(f"{self.state.extras[n][i]:.6g}" for n in names)])
        with atomic_path(self.out / LOSS_FILE, ".csv") as tmp:
            tmp.write_text(buf.getvalue())
        first = float(np.mean(self.state.losses[:5]))
        final = float(np.mean(self.state.losses[-5:]))
        write_json(self.out / METRICS_FILE, {**{k: v for k, v in last.items() if k != "step_s"}, "loss_first5": first, "loss_last5": final})

    def cleanup(self) -> None:
        self.cache.clear()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def train_loop_per_worker(config: dict[str, Any]) -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    recipe = config["recipe"](config["cfg"])
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


def fit(cfg: Stage2Config, recipe: type[Stage2Recipe], rows: list[dict[str, Any]], loader: Any,
        loader_kwargs: dict[str, Any], resumed_from: int) -> dict[str, Any]:
    """Stream ``rows`` (from the resume position on) through ``loader`` with Ray Data into a
    ``TorchTrainer`` running ``recipe`` on ``train.num_workers`` workers; the run's summary."""
    from ray.data import ActorPoolStrategy, DataContext

    t = cfg.train
    DataContext.get_current().execution_options.preserve_order = True
    dataset = ray.data.from_items(rows).map(loader, fn_constructor_kwargs=loader_kwargs,
                                                compute=ActorPoolStrategy(size=1))
    out = Path(t.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    trainer = TorchTrainer(
        train_loop_per_worker, train_loop_config={"cfg": cfg, "recipe": recipe},
        scaling_config=ScalingConfig(num_workers=t.num_workers, use_gpu=t.use_gpu),
        run_config=RunConfig(name=recipe.__name__, storage_path=str(out.resolve() / "ray")),
        datasets={"train": dataset},
    )
    trainer.fit()
    final_step, _ = resume_position(cfg)
    losses = _read_losses(out / LOSS_FILE)
    return {"steps": final_step, "resumed_from": resumed_from, "trained_steps": final_step - resumed_from,
            "loss_first": losses[0] if losses else math.nan, "loss_last": losses[-1] if losses else math.nan,
            "seconds": round(time.perf_counter() - t0, 1), "out": str(out)}


def _read_losses(path: Path) -> list[float]:
    if not path.is_file():
        return []
    with open(path) as fh:
        return [float(row["loss"]) for row in csv.DictReader(fh)]
