"""Training checkpoints: folders written beside their target, then swapped into place.

A checkpoint folder (``<output_dir>/checkpoints/last``, ``best``, ``step_N``) holds

- ``model.safetensors``: the unwrapped pipeline's ``state_dict()``;
- ``model_ema.safetensors``: the EMA weights, when ``train.ema`` is on;
- ``state/``: what ``Accelerator.save_state`` writes (optimizer, scheduler,
  grad scaler, EMA, every process's RNG streams);
- ``meta.json``: epoch, step, best metric, the batch geometry; written last.

The folder is filled under a temporary name and renamed into place, so a run
killed mid-write leaves the previous checkpoint untouched. Swapping a folder
for another takes two renames; if a run dies between them the previous
checkpoint survives as ``.<name>.old``, which :func:`resolve_checkpoint` finds.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors.torch import save_file
from torch import nn

WEIGHTS_NAME = "model.safetensors"
EMA_WEIGHTS_NAME = "model_ema.safetensors"
META_NAME = "meta.json"
STATE_DIR = "state"

if TYPE_CHECKING:
    from accelerate import Accelerator


class CheckpointNotFound(FileNotFoundError):
    """No usable checkpoint at the given place."""


def checkpoints_dir(output_dir: str | Path) -> Path:
    return Path(output_dir) / "checkpoints"


def _temporary(target: Path) -> Path:
    return target.parent / f".{target.name}.tmp"


def _previous(target: Path) -> Path:
    return target.parent / f".{target.name}.old"


def save_weights(state_dict: dict[str, torch.Tensor], path: Path) -> None:
    """A state dict as safetensors (contiguous CPU copies; safetensors refuses views)."""
    save_file({k: v.detach().to("cpu").contiguous() for k, v in state_dict.items()}, str(path))


def write_meta(folder: Path, meta: dict[str, Any]) -> None:
    (folder / META_NAME).write_text(json.dumps(meta, indent=2) + "\n")


def read_meta(folder: str | Path) -> dict[str, Any]:
    return json.loads((Path(folder) / META_NAME).read_text())


def begin(target: Path) -> Path:
    """A fresh temporary folder beside ``target`` to fill (main process only)."""
    tmp = _temporary(target)
    if tmp.exists():
        shutil.rmtree(tmp)  # left over by a write that never finished
    tmp.mkdir(parents=True)
    return tmp


def commit(tmp: Path, target: Path) -> None:
    """Swap a completely written ``tmp`` in as ``target`` (main process only)."""
    if not (tmp / META_NAME).is_file():
        raise RuntimeError(f"{tmp} has no {META_NAME}; refusing to install an incomplete checkpoint")
    previous = _previous(target)
    if target.exists():
        if previous.exists():
            shutil.rmtree(previous)  # stale: target is complete
        os.replace(target, previous)
    # if target was missing, `previous` (if any) is the last good copy until this rename
    os.replace(tmp, target)
    if previous.exists():
        shutil.rmtree(previous)


def copy_checkpoint(source: Path, target: Path) -> None:
    """Install a copy of a complete checkpoint under another name (``best``, ``step_N``)."""
    tmp = _temporary(target)
    if tmp.exists():
        shutil.rmtree(tmp)
    shutil.copytree(source, tmp)
    commit(tmp, target)


def resolve_checkpoint(path: str | Path) -> Path:
    """The checkpoint folder meant by ``path``.

    ``path`` is a checkpoint folder, or a run's output folder (its ``last``
    checkpoint). A checkpoint whose swap was interrupted is found under its
    ``.old`` name.
    """
    path = Path(path)
    candidates = [path, _previous(path)]
    if (path / "checkpoints").is_dir():
        last = checkpoints_dir(path) / "last"
        candidates = [last, _previous(last)]
    for candidate in candidates:
        if (candidate / META_NAME).is_file() and (candidate / WEIGHTS_NAME).is_file():
            return candidate
    raise CheckpointNotFound(
        f"no checkpoint at {path}; give a checkpoint folder (with {META_NAME} and {WEIGHTS_NAME}) "
        "or a training output folder that has checkpoints/last"
    )


def load_checkpoint_weights(pipe: nn.Module, path: str | Path, ema: bool = False, strict: bool = True) -> nn.Module:
    """Load a checkpoint's weights into ``pipe``.

    ``path`` is a checkpoint folder, a run's output folder (``best`` if it
    exists, else ``last``) or a weights file; ``ema=True`` loads the EMA
    weights of a folder. Reading is :func:`dynvit.weights.load_pipeline_weights`.
    """
    from dynvit.weights import load_pipeline_weights

    load_pipeline_weights(pipe, run_checkpoint(path), strict=strict, ema=ema)
    return pipe


def run_checkpoint(path: str | Path) -> Path:
    """``path`` itself, or for a run's output folder its ``best`` checkpoint (else ``last``)."""
    path = Path(path)
    if path.is_dir() and (path / "checkpoints").is_dir():
        best = checkpoints_dir(path) / "best"
        return best if (best / WEIGHTS_NAME).is_file() else resolve_checkpoint(path)
    return path


def weights_digest(model: nn.Module) -> str:
    """SHA-256 of a model's parameters and buffers: equal digests mean bit-identical replicas."""
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().to("cpu").contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def save_training_checkpoint(
    accelerator: Accelerator, model: nn.Module, target: Path, meta: dict[str, Any], ema: nn.Module | None = None
) -> None:
    """Write a resumable checkpoint to ``target`` atomically; every process calls this.

    Each process saves its own RNG streams into the shared temporary folder
    (``output_dir`` must be on storage every node sees); the main process adds
    the weights and ``meta.json`` and swaps the folder into place.
    """
    tmp = _temporary(target)
    if accelerator.is_main_process:
        begin(target)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp / STATE_DIR))
    if accelerator.is_main_process:
        save_weights(accelerator.get_state_dict(model), tmp / WEIGHTS_NAME)
        if ema is not None:
            save_weights(ema.module.state_dict(), tmp / EMA_WEIGHTS_NAME)
        write_meta(tmp, meta)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        commit(tmp, target)
    accelerator.wait_for_everyone()


def load_training_checkpoint(accelerator: Accelerator, folder: Path) -> dict[str, Any]:
    """Restore model, optimizer, registered objects (scheduler, EMA) and RNG streams; returns the meta data."""
    accelerator.load_state(str(folder / STATE_DIR))
    return read_meta(folder)
