"""Training checkpoints as safetensors: model, optimizer and data position, never a pickle.

A checkpoint is a folder ``<out>/checkpoints/step_<N>/`` written atomically (``atomic_dir``):

- ``model.safetensors``: PortraitDiT's state dict; the backbone's keys under ``transformer.`` are
  exactly ``WanTransformer3DModel``'s, so ``backbone_state`` loads them into a plain Wan model;
- ``optimizer.safetensors``: every tensor of the optimizer state, keyed ``state.<param>.<name>``;
- ``state.json``: the step, the next data position, the optimizer's param groups and the loss
  history, so a resumed run continues the same loss curve.

Loading uses ``safetensors`` and JSON only: a checkpoint from elsewhere cannot run code.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from cogportrait.io.atomic import atomic_dir
from training.errors import CheckpointError

MODEL_FILE = "model.safetensors"
OPTIMIZER_FILE = "optimizer.safetensors"
STATE_FILE = "state.json"
_STEP_DIR = re.compile(r"^step_(\d+)$")


@dataclass
class TrainerState:
    step: int = 0  # optimizer steps done
    position: int = 0  # next data position (samples consumed, over all workers)
    losses: list[float] = field(default_factory=list)  # one per step, the mean over workers
    extras: dict[str, list[float]] = field(default_factory=dict)  # a recipe's own per-step numbers (rank 0's)


def save_checkpoint(folder: str | Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None, state: TrainerState,
                    keep: int | None = None) -> Path:
    """Write ``<folder>/step_<N>`` atomically and keep the newest ``keep`` checkpoints."""
    folder = Path(folder)
    target = folder / f"step_{state.step:08d}"
    with atomic_dir(target) as tmp:
        save_file({k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}, str(tmp / MODEL_FILE))
        groups: list[dict[str, Any]] = []
        scalars: dict[str, Any] = {}
        if optimizer is not None:
            opt = optimizer.state_dict()
            tensors = {}
            for index, values in opt["state"].items():
                for name, value in values.items():
                    if torch.is_tensor(value):
                        tensors[f"state.{index}.{name}"] = value.detach().contiguous().cpu()
                    else:
                        scalars[f"state.{index}.{name}"] = value
            save_file(tensors, str(tmp / OPTIMIZER_FILE))
            groups = opt["param_groups"]
        (tmp / STATE_FILE).write_text(json.dumps({"step": state.step, "position": state.position, "losses": state.losses, "extras": state.extras,
                                                  "param_groups": groups, "optimizer_scalars": scalars}, indent=1) + "\n")
    if keep:
        for old in list_checkpoints(folder)[:-keep]:
            shutil.rmtree(old)
    return target


def list_checkpoints(folder: str | Path) -> list[Path]:
    """Complete checkpoints in ``folder``, oldest first."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := _STEP_DIR.match(p.name)) and (p / STATE_FILE).is_file()]
    return [p for _, p in sorted(found)]


def latest_checkpoint(folder: str | Path) -> Path | None:
    found = list_checkpoints(folder)
    return found[-1] if found else None


def resolve_checkpoint(path: str | Path) -> Path | None:
    """A checkpoint as a config or flag names it: "" -> None (the training config's own weights); a
    checkpoint folder (or a bare model.safetensors) as is; a folder of ``step_*`` checkpoints
    (``train``'s ``checkpoints/``) -> its latest."""
    if not str(path):
        return None
    p = Path(path)
    if p.is_file() or (p / MODEL_FILE).is_file():
        return p.resolve()
    latest = latest_checkpoint(p)
    if latest is None:
        raise CheckpointError(f"no Stage 2 checkpoint at {p} (a folder with {MODEL_FILE}, or train's checkpoints/ folder; "
                              f"\"\" for the training config's own weights)")
    return latest.resolve()


def _require(path: Path) -> Path:
    if not path.is_file():
        raise CheckpointError(f"checkpoint file {path} is missing")
    return path


def load_model_weights(checkpoint: str | Path, model: torch.nn.Module) -> None:
    """Load a checkpoint's (or a bare ``model.safetensors``'s) weights into ``model``, all keys required."""
    path = Path(checkpoint)
    if path.is_dir():
        path = path / MODEL_FILE
    model.load_state_dict(load_file(str(_require(path))), strict=True)


def load_checkpoint(checkpoint: str | Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None) -> TrainerState:
    """Restore model, optimizer and trainer state from a checkpoint folder."""
    checkpoint = Path(checkpoint)
    load_model_weights(checkpoint, model)
    meta = json.loads(_require(checkpoint / STATE_FILE).read_text())
    trainer_state = _trainer_state(meta)
    if optimizer is not None and meta["param_groups"]:
        flat = load_file(str(_require(checkpoint / OPTIMIZER_FILE)))
        state: dict[int, dict[str, torch.Tensor]] = {}
        for key, value in flat.items():
            _, index, name = key.split(".", 2)
            state.setdefault(int(index), {})[name] = value
        for key, value in meta.get("optimizer_scalars", {}).items():
            _, index, name = key.split(".", 2)
            state.setdefault(int(index), {})[name] = value
        optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
    return trainer_state


def read_state(checkpoint: str | Path) -> TrainerState:
    """A checkpoint's step, data position and losses, without loading any weights."""
    return _trainer_state(json.loads(_require(Path(checkpoint) / STATE_FILE).read_text()))


def _trainer_state(meta: dict[str, Any]) -> TrainerState:
    return TrainerState(step=int(meta["step"]), position=int(meta["position"]), losses=[float(x) for x in meta["losses"]],
                        extras={k: [float(x) for x in v] for k, v in meta.get("extras", {}).items()})


def backbone_state(checkpoint: str | Path) -> dict[str, torch.Tensor]:
    """The Wan backbone's own state dict out of a checkpoint (keys as ``WanTransformer3DModel`` names them)."""
    path = Path(checkpoint)
    weights = load_file(str(_require(path / MODEL_FILE if path.is_dir() else path)))
    return {k[len("transformer."):]: v for k, v in weights.items() if k.startswith("transformer.")}


def weights_hash(checkpoint: str | Path) -> str:
    """sha256 of a checkpoint's model weights: what every generated video records."""
    path = Path(checkpoint)
    path = _require(path / MODEL_FILE if path.is_dir() else path)
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
