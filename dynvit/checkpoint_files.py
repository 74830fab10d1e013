"""Checkpoint files: where a run keeps them and how a file is read safely.

The one module both :mod:`dynvit.weights` (what the tensors mean) and
:mod:`dynvit.training.checkpoint` (how a run writes them) build on; it
imports neither. Every file is read with ``torch.load(..., weights_only=True)``
or safetensors, so a checkpoint can never run code on load.

A training run keeps ``<output_dir>/checkpoints/{last,best,step_N}/``, each
with ``model.safetensors`` and ``meta.json`` (see
:mod:`dynvit.training.checkpoint`). Swapping a folder for a newer copy takes
two renames; a run killed between them leaves the previous copy as
``.<name>.old``, which the lookups here find.
"""

from __future__ import annotations

import os
import pickle
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from torch import Tensor

from dynvit.errors import DynvitError

PathLike = str | os.PathLike
StateDict = dict[str, Tensor]

WEIGHTS_NAME = "model.safetensors"
EMA_WEIGHTS_NAME = "model_ema.safetensors"
META_NAME = "meta.json"
STATE_DIR = "state"


class CheckpointError(DynvitError, ValueError):
    """A checkpoint that cannot be read or does not fit; the message says why and what to do."""


class CheckpointNotFound(DynvitError, FileNotFoundError):
    """No usable checkpoint at the given place."""


# -- where a run keeps its checkpoints --------------------------------------------------


def checkpoints_dir(output_dir: str | Path) -> Path:
    return Path(output_dir) / "checkpoints"


def temporary_path(target: Path) -> Path:
    return target.parent / f".{target.name}.tmp"


def previous_path(target: Path) -> Path:
    return target.parent / f".{target.name}.old"


def installed(target: Path, need_meta: bool = True) -> Path | None:
    """``target`` if it is a complete checkpoint, else the copy an interrupted swap left as ``.<name>.old``.

    ``need_meta=False`` accepts a folder with weights alone (enough to evaluate, not to resume).
    """
    for candidate in (target, previous_path(target)):
        if (candidate / WEIGHTS_NAME).is_file() and (not need_meta or (candidate / META_NAME).is_file()):
            return candidate
    return None


def resolve_checkpoint(path: str | Path) -> Path:
    """The checkpoint folder meant by ``path``.

    ``path`` is a checkpoint folder, or a run's output folder (its ``last``
    checkpoint). A checkpoint whose swap was interrupted is found under its
    ``.old`` name.
    """
    path = Path(path)
    if (path / "checkpoints").is_dir():
        path = checkpoints_dir(path) / "last"
    found = installed(path)
    if found is not None:
        return found
    raise CheckpointNotFound(
        f"no checkpoint at {path}; give a checkpoint folder (with {META_NAME} and {WEIGHTS_NAME}) "
        "or a training output folder that has checkpoints/last"
    )


def run_checkpoint(path: str | Path) -> Path:
    """``path`` itself, or for a run's output folder its ``best`` checkpoint (else ``last``)."""
    path = Path(path)
    if path.is_dir() and (path / "checkpoints").is_dir():
        # a swap of `best` killed between its two renames leaves it as `.best.old`
        return installed(checkpoints_dir(path) / "best", need_meta=False) or resolve_checkpoint(path)
    return path


# -- reading a file safely ---------------------------------------------------------------


def read_checkpoint(path: PathLike) -> dict[str, Any]:
    """The top-level dictionary of a ``.safetensors`` file or a ``torch.save`` file, loaded safely."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist or is not a file")
    if path.suffix == ".safetensors":
        try:
            return load_file(path, device="cpu")
        except Exception as exc:  # safetensors' own error type for a bad header or a short file
            raise CheckpointError(
                f"{path} is not a readable safetensors file ({_first_line(exc)}): it is truncated, corrupt or "
                "not a checkpoint; copy or export it again"
            ) from None
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        unsafe = re.search(r"Unsupported global: GLOBAL (\S+)", str(exc))
        if unsafe is None:  # random bytes fail in the unpickler too, but are no pickle of anything
            detail = re.search(r"WeightsUnpickler error:\s*(.+)", str(exc))
            raise _unreadable(path, exc, detail.group(1).strip() if detail else None) from None
        raise CheckpointError(
            f"{path} holds Python objects ({unsafe.group(1)}) that are not loaded for safety (torch.load with "
            "weights_only=True refused it). dynvit loads only tensors in plain dicts/lists. In an environment you "
            "trust, re-save just the weights: torch.save({'model': torch.load(src, weights_only=False)['model']}, dst)"
        ) from None
    except Exception as exc:  # zip, EOF and stream errors of a damaged file
        raise _unreadable(path, exc) from None
    if not isinstance(obj, Mapping):
        raise CheckpointError(
            f"{path} holds a {type(obj).__name__}, not a dictionary of tensors; "
            "save a state dict (torch.save(model.state_dict(), path)) or {'model': state_dict}"
        )
    return dict(obj)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _unreadable(path: Path, exc: BaseException, detail: str | None = None) -> CheckpointError:
    return CheckpointError(
        f"{path} is not a readable torch checkpoint ({type(exc).__name__}: {detail or _first_line(exc)}): "
        "it is truncated, corrupt or not a checkpoint; copy or export it again"
    )


# entries a checkpoint may keep its weights under, tried in this order (DVT's release: model_state_dict)
STATE_DICT_ENTRIES = ("model", "state_dict", "model_state_dict")


def state_dict_from(checkpoint: Mapping[str, Any], source: PathLike | str = "checkpoint") -> StateDict:
    """The state dict inside a checkpoint: its ``model`` (or ``state_dict``, ``model_state_dict``) entry, or the
    checkpoint itself.

    A ``module.`` prefix on every key (a model saved through DistributedDataParallel)
    and torch.compile's ``_orig_mod.`` are removed.
    """
    inner: Any = checkpoint
    for key in STATE_DICT_ENTRIES:
        if isinstance(checkpoint.get(key), Mapping):
            inner = checkpoint[key]
            break
    bad = [k for k, v in inner.items() if not isinstance(v, Tensor)]
    if bad:
        shown = ", ".join(f"{k!r} ({type(inner[k]).__name__})" for k in bad[:5])
        raise CheckpointError(
            f"{source} is not a dictionary of tensors: {shown}{' ...' if len(bad) > 5 else ''}; "
            "expected a state dict, or a dict whose 'model' entry is one"
        )
    state = {str(k): v for k, v in inner.items()}
    for prefix in ("module.", "_orig_mod."):
        if state and all(k.startswith(prefix) for k in state):
            state = {k[len(prefix) :]: v for k, v in state.items()}
    return state
