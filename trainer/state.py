"""The resumable part of a checkpoint, ``training_state/``: optimizer, scheduler, scaler and
position. Tensors go to safetensors and everything else to JSON; nothing is pickled.

No RNG state is kept: batches are a function of (seed, epoch, step) and the loop reseeds dropout
from (seed, step, rank) before every step, so a resumed run needs nothing else to replay."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

STATE_DIR = "training_state"


def save_training_state(directory: Path, optimizer: torch.optim.Optimizer, scheduler, scaler,
                        progress: dict) -> None:
    """Write ``directory/training_state/``: ``optimizer.safetensors`` (every per-parameter optimizer
    tensor, keyed ``state.<param index>.<name>``, e.g. AdamW's ``exp_avg``) and ``state.json`` (the
    optimizer's param groups, the scheduler's and scaler's state dicts, and ``progress``: step, best
    metric, total steps, world size, skipped non-finite steps). Raises OSError when it cannot write."""
    d = Path(directory) / STATE_DIR
    d.mkdir(parents=True, exist_ok=True)
    opt = optimizer.state_dict()
    tensors = {}
    for idx, per_param in opt["state"].items():
        for name, value in per_param.items():
            tensors[f"state.{idx}.{name}"] = (value if torch.is_tensor(value) else torch.tensor(value)).contiguous().cpu()
    save_file(tensors, str(d / "optimizer.safetensors"))
    meta = {
        "progress": progress,
        "optimizer_param_groups": opt["param_groups"],
        "scheduler": scheduler.state_dict(),
        "scaler": scaler.state_dict(),
    }
    (d / "state.json").write_text(json.dumps(meta, indent=2) + "\n")


def load_training_state(directory: Path, optimizer: torch.optim.Optimizer, scheduler, scaler) -> dict:
    """Restore optimizer, scheduler and scaler; return the saved progress dictionary."""
    d = Path(directory) / STATE_DIR
    for name in ("optimizer.safetensors", "state.json"):
        if not (d / name).is_file():
            raise FileNotFoundError(f"{d / name}: missing; this checkpoint cannot be resumed")
    meta = json.loads((d / "state.json").read_text())
    state: dict[int, dict] = {}
    for key, value in load_file(str(d / "optimizer.safetensors")).items():
        _, idx, name = key.split(".", 2)
        state.setdefault(int(idx), {})[name] = value
    optimizer.load_state_dict({"state": state, "param_groups": meta["optimizer_param_groups"]})
    scheduler.load_state_dict(meta["scheduler"])
    if meta["scaler"]:
        scaler.load_state_dict(meta["scaler"])
    return meta["progress"]
