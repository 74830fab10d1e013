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

import errno
import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from dynvit.checkpoint_files import (  # noqa: F401 - the names runs and tests use, kept importable from here
    EMA_WEIGHTS_NAME,
    META_NAME,
    STATE_DIR,
    WEIGHTS_NAME,
    CheckpointError,
    CheckpointNotFound,
    checkpoints_dir,
    installed,
    previous_path,
    resolve_checkpoint,
    run_checkpoint,
    temporary_path,
)
from dynvit.errors import DynvitError
from dynvit.weights import load_checkpoint_weights, summarise_keys  # noqa: F401

if TYPE_CHECKING:
    from accelerate import Accelerator


class CheckpointWriteError(DynvitError, RuntimeError):
    """A checkpoint could not be written (a full disk, say); the previous one is intact."""


# below this much free space after a failed write, the disk was full
_FULL_DISK_BYTES = 4 << 20


def _write_failure(exc: BaseException, tmp: Path, target: Path) -> CheckpointWriteError:
    """Remove a partly written ``tmp`` and say what went wrong, naming the checkpoint that survives."""
    try:
        free = shutil.disk_usage(tmp.parent if tmp.parent.exists() else target.parent).free
    except OSError:
        free = None
    shutil.rmtree(tmp, ignore_errors=True)
    chain, cause = [], exc
    while cause is not None:
        chain.append(cause)
        cause = cause.__cause__ or cause.__context__
    no_space = any(isinstance(e, OSError) and e.errno == errno.ENOSPC for e in chain) or (
        free is not None and free < _FULL_DISK_BYTES
    )
    try:
        kept = f"the previous checkpoint is intact: {resolve_checkpoint(target)}"
    except CheckpointNotFound:
        kept = "no earlier checkpoint exists"
    if no_space:
        what = f"no space left on device while writing {target} ({(free or 0) / 2**20:.1f} MiB free there)"
        fix = "Free some space or choose another train.output_dir, then resume with --resume auto"
    else:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        what = f"writing checkpoint {target} failed: {reason}"
        fix = "Check that the folder is writable, then resume with --resume auto"
    return CheckpointWriteError(f"{what}; the partial copy was removed and {kept}. {fix}")


def save_weights(state_dict: dict[str, torch.Tensor], path: Path) -> None:
    """A state dict as safetensors (contiguous CPU copies; safetensors refuses views)."""
    save_file({k: v.detach().to("cpu").contiguous() for k, v in state_dict.items()}, str(path))


def write_meta(folder: Path, meta: dict[str, Any]) -> None:
    (folder / META_NAME).write_text(json.dumps(meta, indent=2) + "\n")


def read_meta(folder: str | Path) -> dict[str, Any]:
    return json.loads((Path(folder) / META_NAME).read_text())


def begin(target: Path) -> Path:
    """A fresh temporary folder beside ``target`` to fill (main process only)."""
    tmp = temporary_path(target)
    if tmp.exists():
        shutil.rmtree(tmp)  # left over by a write that never finished
    tmp.mkdir(parents=True)
    return tmp


def commit(tmp: Path, target: Path) -> None:
    """Swap a completely written ``tmp`` in as ``target`` (main process only)."""
    if not (tmp / META_NAME).is_file():
        raise RuntimeError(f"{tmp} has no {META_NAME}; refusing to install an incomplete checkpoint")
    previous = previous_path(target)
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
    tmp = temporary_path(target)
    if tmp.exists():
        shutil.rmtree(tmp)
    try:
        shutil.copytree(source, tmp)
    except Exception as exc:
        raise _write_failure(exc, tmp, target) from exc
    commit(tmp, target)


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
    tmp = temporary_path(target)
    if accelerator.is_main_process:
        begin(target)
    accelerator.wait_for_everyone()
    try:
        accelerator.save_state(str(tmp / STATE_DIR))
        if accelerator.is_main_process:
            save_weights(accelerator.get_state_dict(model), tmp / WEIGHTS_NAME)
            if ema is not None:
                save_weights(ema.module.state_dict(), tmp / EMA_WEIGHTS_NAME)
            write_meta(tmp, meta)
    except Exception as exc:  # torch.save reports a full disk as a bare stream error
        raise _write_failure(exc, tmp, target) from exc
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        commit(tmp, target)
    accelerator.wait_for_everyone()


def check_resumable(model: nn.Module, folder: Path) -> None:
    """Refuse, naming keys and shapes, a checkpoint whose weights do not fit ``model`` (another recipe's run)."""
    try:
        with safe_open(str(folder / WEIGHTS_NAME), framework="pt") as f:
            theirs = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118 - not a dict
    except Exception as exc:
        raise CheckpointError(
            f"{folder / WEIGHTS_NAME} cannot be read ({exc}); resume from another checkpoint"
        ) from None
    ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    if theirs == ours:
        return
    lines = []
    if set(ours) - set(theirs):
        lines.append(f"missing from the checkpoint: {summarise_keys(set(ours) - set(theirs), 6)}")
    if set(theirs) - set(ours):
        lines.append(f"not in this model: {summarise_keys(set(theirs) - set(ours), 6)}")
    reshaped = sorted(k for k in set(ours) & set(theirs) if ours[k] != theirs[k])
    if reshaped:
        lines.append("other shape: " + "; ".join(f"{k} {theirs[k]} vs {ours[k]}" for k in reshaped[:4]))
    raise CheckpointError(
        f"{folder} was written by a run of another model ({'; '.join(lines)}); resume it with the recipe it was "
        f"trained with (its recipe.yaml), or start this recipe fresh in another output folder, optionally from its "
        f"backbone with train.init_backbone={folder}"
    )


def load_training_checkpoint(accelerator: Accelerator, folder: Path) -> dict[str, Any]:
    """Restore model, optimizer, registered objects (scheduler, EMA) and RNG streams; returns the meta data."""
    try:
        meta = read_meta(folder)
        accelerator.load_state(str(folder / STATE_DIR))
    except Exception as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(
            f"{folder} cannot be resumed: its training state is damaged or incomplete ({type(exc).__name__}: "
            f"{reason}); resume from another checkpoint (checkpoints/best or step_N), or start afresh from its "
            f"weights with train.init_backbone={folder}"
        ) from None
    return meta
