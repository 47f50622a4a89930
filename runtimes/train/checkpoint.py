"""Training checkpoints: everything a resumed run needs to continue bit for bit, without pickle.

A checkpoint directory holds trainable.safetensors (the trained weights under their parameter
names), optimizer.safetensors (AdamW moments and step counts, plus gradients accumulated so far
when the run stopped between micro-batches, plus each process's RNG state) and state.json (the
resolved parameters, data position, schedule position, metric history). For adapters it also holds
adapter/ in PEFT format, so a checkpoint can be tried with `generate` before training ends.
Written to a temporary sibling and renamed, so a crash never leaves a half checkpoint behind.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Any

STATE_FILE = "state.json"
FORMAT = "mlsidecar-checkpoint-1"


class CheckpointInvalid(Exception):
    error_kind = "checkpoint_invalid"

    def __init__(self, path: Path, why: str) -> None:
        super().__init__(f"{path} is not a usable training checkpoint: {why}; pass a directory from a train "
                         "result's `checkpoints` or a cancelled train's data.partial.checkpoint")
        self.error_detail = {"path": str(path)}


def save_checkpoint(dest: Path, *, trainable: dict[str, Any], optimizer: Any, param_names: dict[int, str],
                    grads: dict[str, Any] | None, rng_states: list[Any], state: dict[str, Any],
                    save_adapter: Any | None = None) -> Path:
    """Write atomically; `param_names` maps id(parameter) to its name for the optimizer state."""
    from safetensors.torch import save_file

    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    temp = dest.with_name(f".{dest.name}.tmp-{uuid.uuid4().hex[:8]}")
    temp.mkdir()
    try:
        save_file({name: t.detach().contiguous() for name, t in trainable.items()}, str(temp / "trainable.safetensors"))
        tensors, groups = _optimizer_tensors(optimizer, param_names)
        for name, grad in (grads or {}).items():
            tensors[f"grad/{name}"] = grad.detach().contiguous()
        for rank, rng in enumerate(rng_states):
            tensors[f"rng/torch/{rank}"] = rng
        save_file(tensors, str(temp / "optimizer.safetensors"))
        if save_adapter is not None:
            save_adapter(temp / "adapter")
        payload = {"format": FORMAT, **state, "optimizer_groups": groups, "has_grads": bool(grads), "world_size": len(rng_states)}
        (temp / STATE_FILE).write_text(json.dumps(payload, indent=1, sort_keys=True), encoding="utf-8")
        for path in temp.rglob("*"):
            if path.is_file():
                with open(path, "rb") as handle:
                    os.fsync(handle.fileno())
        if dest.exists():
            shutil.rmtree(dest)
        os.rename(temp, dest)
    except BaseException:
        shutil.rmtree(temp, ignore_errors=True)
        raise
    return dest


def _optimizer_tensors(optimizer: Any, param_names: dict[int, str]) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    tensors: dict[str, Any] = {}
    groups = []
    for group in optimizer.param_groups:
        groups.append({k: v for k, v in group.items() if k != "params" and isinstance(v, (int, float, bool, str, tuple, list, type(None)))})
        for param in group["params"]:
            for key, value in optimizer.state.get(param, {}).items():
                tensors[f"state/{param_names[id(param)]}/{key}"] = value.detach().contiguous()
    return tensors, groups


def read_state(path: Path) -> dict[str, Any]:
    path = Path(path)
    state_file = path / STATE_FILE
    if not state_file.is_file():
        raise CheckpointInvalid(path, f"it has no {STATE_FILE}")
    try:
        state = json.loads(state_file.read_text(encoding="utf-8"))
    except ValueError as exc:
        raise CheckpointInvalid(path, f"{STATE_FILE} is not JSON ({exc})") from None
    if state.get("format") != FORMAT:
        raise CheckpointInvalid(path, f"unknown format {state.get('format')!r}")
    for name in ("trainable.safetensors", "optimizer.safetensors"):
        if not (path / name).is_file():
            raise CheckpointInvalid(path, f"{name} is missing")
    return state


def load_checkpoint(path: Path, *, named_trainable: dict[str, Any], optimizer: Any, param_names: dict[int, str]) -> tuple[dict[str, Any], list[Any]]:
    """Restore weights and optimizer in place; returns (accumulated grads by name, RNG state per rank)."""
    import torch
    from safetensors.torch import load_file

    path = Path(path)
    state = read_state(path)
    weights = load_file(str(path / "trainable.safetensors"))
    missing = sorted(set(named_trainable) - set(weights))
    unexpected = sorted(set(weights) - set(named_trainable))
    if missing or unexpected:
        raise CheckpointInvalid(path, f"its weights do not match this model and method (missing {missing[:3]}, unexpected {unexpected[:3]})")
    with torch.no_grad():
        for name, param in named_trainable.items():
            if weights[name].shape != param.shape:
                raise CheckpointInvalid(path, f"{name} has shape {tuple(weights[name].shape)}, the model wants {tuple(param.shape)}")
            param.copy_(weights[name])
    tensors = load_file(str(path / "optimizer.safetensors"))
    by_name = {name: param for param in named_trainable.values() for name in [param_names[id(param)]]}
    for key, value in tensors.items():
        if key.startswith("state/"):
            name, _, field = key[len("state/"):].rpartition("/")
            optimizer.state[by_name[name]][field] = value
    for group, saved in zip(optimizer.param_groups, state.get("optimizer_groups", [])):
        for key, value in saved.items():
            group[key] = tuple(value) if isinstance(group.get(key), tuple) else value
    grads = {key[len("grad/"):]: value for key, value in tensors.items() if key.startswith("grad/")}
    rngs = [tensors[f"rng/torch/{rank}"] for rank in range(int(state.get("world_size", 1))) if f"rng/torch/{rank}" in tensors]
    return grads, rngs
