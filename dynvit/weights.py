"""Weights in and out: timm/DeiT backbones, dynvit pipelines, the authors' LF-ViT and CF-ViT checkpoints.

Every file is read with ``torch.load(..., weights_only=True)`` or
safetensors, so a checkpoint can never run code on load; anything that is
not a dictionary of tensors is refused with an error that says how to fix
the file. Every file is written atomically (temp file + ``os.replace``), so
an interrupted write never leaves a truncated checkpoint behind.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import uuid
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from timm.models.vision_transformer import checkpoint_filter_fn
from torch import Tensor, nn

from dynvit.checkpoint_files import (
    STATE_DICT_ENTRIES,
    WEIGHTS_NAME,
    CheckpointError,
    PathLike,
    StateDict,
    read_checkpoint,
    run_checkpoint,
    state_dict_from,
)

logger = logging.getLogger(__name__)


# where a dynvit pipeline keeps the timm model's tensors (``pipe.backbone.model``)
PIPELINE_BACKBONE_PREFIX = "backbone.model."
# the file a training checkpoint folder keeps the pipeline's weights in (Accelerate's name)
PIPELINE_WEIGHTS_NAME = WEIGHTS_NAME


@dataclass
class LoadReport:
    """What loading a checkpoint did, beyond copying matching tensors."""

    missing: list[str] = field(default_factory=list)  # in the model, not in the checkpoint (kept as initialised)
    unexpected: list[str] = field(default_factory=list)  # in the checkpoint, not in the model (ignored)
    mismatched: list[str] = field(default_factory=list)  # same name, other shape (skipped; non-strict only)
    dropped: list[str] = field(default_factory=list)  # deliberately left out (a head with another class count)
    resampled: list[str] = field(default_factory=list)  # tables resampled to the model's grid

    @property
    def exact(self) -> bool:
        return not (self.missing or self.unexpected or self.mismatched or self.dropped)


def _pattern(key: str) -> str:
    return re.sub(r"\.\d+(?=\.)", ".*", key)


def summarise_keys(keys: Iterable[str], limit: int = 12) -> str:
    """Keys grouped by pattern (``blocks.*.attn.qkv.weight (x12)``), for error messages."""
    groups: dict[str, list[str]] = {}
    for key in sorted(keys):
        groups.setdefault(_pattern(key), []).append(key)
    items = [f"{p} (x{len(k)})" if len(k) > 1 else k[0] for p, k in groups.items()]
    more = f", ... {len(items) - limit} more" if len(items) > limit else ""
    return ", ".join(items[:limit]) + more


def _compare(state: Mapping[str, Tensor], reference: Mapping[str, Tensor]) -> LoadReport:
    return LoadReport(
        missing=sorted(set(reference) - set(state)),
        unexpected=sorted(set(state) - set(reference)),
        mismatched=sorted(k for k in set(state) & set(reference) if state[k].shape != reference[k].shape),
    )


def _log_report(report: LoadReport, source: PathLike) -> None:
    if report.resampled:
        logger.info("%s: resampled %s to the model's grid", source, ", ".join(report.resampled))
    if report.dropped:
        logger.warning("%s: left out %s (the class count differs)", source, summarise_keys(report.dropped))
    if report.missing:
        logger.warning("%s: missing keys kept as initialised: %s", source, summarise_keys(report.missing))
    if report.unexpected:
        logger.warning("%s: unexpected keys ignored: %s", source, summarise_keys(report.unexpected))
    if report.mismatched:
        logger.warning("%s: keys with another shape skipped: %s", source, summarise_keys(report.mismatched))


# -- timm / DeiT backbone checkpoints ---------------------------------------------


def load_backbone_checkpoint(backbone: nn.Module, path: PathLike) -> LoadReport:
    """Initialise a ``timm_vit`` backbone from a local timm/DeiT checkpoint, or from the backbone
    of a dynvit pipeline (a training run or checkpoint folder, or its weights file).

    The second is how the quickstart LF-ViT starts from its trained
    full-resolution baseline. The checkpoint's position table
    is resampled to the model's full-resolution grid (timm's own checkpoint
    filter), a head with another class count is left out, and the smaller
    stage tables are then resampled from the loaded full-resolution table.
    Missing and unexpected keys are logged and returned.
    """
    model = backbone.model
    path = _pipeline_file(run_checkpoint(path))
    state = state_dict_from(read_checkpoint(path), path)
    if any(k.startswith(PIPELINE_BACKBONE_PREFIX) for k in state):
        state = {
            k[len(PIPELINE_BACKBONE_PREFIX) :]: v for k, v in state.items() if k.startswith(PIPELINE_BACKBONE_PREFIX)
        }
    before = {k: state[k].shape for k in ("pos_embed", "patch_embed.proj.weight") if k in state}
    state = checkpoint_filter_fn(state, model)
    report = LoadReport()
    for key, shape in before.items():
        if key in state and state[key].shape != shape:
            report.resampled.append(f"{key} {tuple(shape)} -> {tuple(state[key].shape)}")
    own = model.state_dict()
    for key in [k for k in state if k.startswith("head.")]:
        if key not in own or own[key].shape != state[key].shape:
            report.dropped.append(key)
            del state[key]
    found = _compare(state, own)
    if found.mismatched:
        detail = "; ".join(f"{k}: {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in found.mismatched[:6])
        raise CheckpointError(
            f"{path} does not fit the backbone ({detail}); it was trained for another architecture: "
            "check model.backbone.arch, embed_dim, depth, num_heads and patch_size"
        )
    if not set(state) & set(own):
        raise CheckpointError(
            f"{path} shares no key with a timm VisionTransformer (its keys: {summarise_keys(state, 6)}); "
            "is it a timm/DeiT checkpoint? A dynvit pipeline checkpoint loads with load_pipeline_weights"
        )
    result = model.load_state_dict(state, strict=False)
    report.missing = sorted(set(result.missing_keys) - set(report.dropped))  # a left-out head is reported once
    report.unexpected = sorted(result.unexpected_keys)
    backbone.reset_stage_position_embeddings()
    _log_report(report, path)
    return report


# -- dynvit pipeline checkpoints --------------------------------------------------


def _pipeline_file(path: Path, name: str = PIPELINE_WEIGHTS_NAME) -> Path:
    if path.is_dir():
        candidate = path / name
        if not candidate.is_file():
            raise CheckpointError(
                f"{path} is a folder without {name}; "
                "give a training run or checkpoint folder, a .safetensors file or a .pth file"
            )
        return candidate
    return path


def load_pipeline_weights(pipe: nn.Module, path: PathLike, strict: bool = True, ema: bool = False) -> LoadReport:
    """Load a dynvit pipeline checkpoint (``.safetensors``, ``.pth``, or a training checkpoint folder;
    ``ema=True`` takes a folder's EMA weights). For a training run's output folder use
    :func:`load_checkpoint_weights`, which finds its best or last checkpoint.

    Strict by default: any missing, unexpected or reshaped key raises an
    error that lists them. With ``strict=False`` what fits is loaded and the
    rest is reported.
    """
    file = _pipeline_file(Path(path), "model_ema.safetensors" if ema else PIPELINE_WEIGHTS_NAME)
    return load_pipeline_state(pipe, state_dict_from(read_checkpoint(file), file), file, strict)


def load_pipeline_state(
    pipe: nn.Module, state: Mapping[str, Tensor], file: PathLike, strict: bool = True
) -> LoadReport:
    """:func:`load_pipeline_weights` for a state dict in memory; ``file`` names it in messages."""
    from dynvit.pipeline import upgrade_state_dict_keys

    if getattr(pipe, "num_stages", None) == 2:  # a two-stage checkpoint written before the stage list
        state = upgrade_state_dict_keys(state)
    own = pipe.state_dict()
    report = _compare(state, own)
    if strict and not report.exact:
        lines = [f"{file} does not match this pipeline:"]
        for label, keys in (
            ("missing from the checkpoint", report.missing),
            ("not in the pipeline", report.unexpected),
        ):
            if keys:
                lines.append(f"  {label} ({len(keys)}): {summarise_keys(keys)}")
        if report.mismatched:
            shapes = "; ".join(
                f"{k}: checkpoint {tuple(state[k].shape)} vs pipeline {tuple(own[k].shape)}"
                for k in report.mismatched[:6]
            )
            lines.append(f"  other shape ({len(report.mismatched)}): {shapes}")
        lines.append(
            "Build the pipeline from the recipe the checkpoint was made with, "
            "or pass strict=False to load only what fits."
        )
        raise CheckpointError("\n".join(lines))
    fitting = {k: v for k, v in state.items() if k in own and k not in report.mismatched}
    pipe.load_state_dict(fitting, strict=False)
    _log_report(report, file)
    return report


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """``write`` to a temporary file beside ``path``, then rename it into place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    # a fresh name in the same folder (so the rename is atomic), created by ``write`` with the usual permissions
    tmp = path.parent / f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp"
    try:
        write(Path(tmp))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_pipeline_weights(
    state: nn.Module | Mapping[str, Tensor], path: PathLike, metadata: Mapping[str, str] | None = None
) -> Path:
    """Write a pipeline's (or a state dict's) tensors to ``path`` as safetensors, atomically."""
    path = Path(path)
    if path.suffix != ".safetensors":
        raise CheckpointError(f"pipeline weights are written as safetensors; name the file *.safetensors, not {path}")
    tensors = state.state_dict() if isinstance(state, nn.Module) else state
    # owned, contiguous copies: safetensors refuses views and shared storage
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}
    header = {"format": "pt", "producer": "dynvit", **(metadata or {})}
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=header))
    return path


# -- the authors' LF-ViT and CF-ViT checkpoints --------------------------------------

# authors' prefix -> dynvit pipeline prefix, for every method below (LF-ViT and CF-ViT share the layout);
# the position tables (pos_embed_list.N) are mapped by shape. When the pipeline's keys move, edit this table.
AUTHORS_KEY_PREFIXES = (
    ("cls_token", "backbone.model.cls_token"),
    ("patch_embed.", "backbone.model.patch_embed."),
    ("blocks.", "backbone.model.blocks."),
    ("norm.", "backbone.model.norm."),
    ("head.", "backbone.model.head."),
    ("reuse_block.", "stages.1.fuser.block."),  # LayerNorm + Mlp(D, 4D, D): the fusion block
)
_AUTHORS_POSITION = re.compile(r"pos_embed_list\.(\d+)")


# DVT's three transformers, in cascade order: the first runs the pipeline's shared backbone, the others
# their stage's own (``stages.<i>.backbone``)
DVT_TRANSFORMERS = ("less_less_token", "less_token", "normal_token")
_DVT_FEATURE_REUSE = re.compile(r"(\w+)\.blocks\.(\d+)\.feature_resuse_mlp\.")  # sic: the authors' spelling


def dvt_key_prefixes(keys: Iterable[str]) -> tuple[tuple[str, str], ...]:
    """The prefix table of one DVT checkpoint (its hooks' indices depend on which reuse it has).

    Each transformer's stage lists its hooks feature reuse first, then
    relation reuse, as the DVT recipes do, numbering only those present:
    an ablation checkpoint without feature reuse has its relation reuse at
    ``hooks.0``. Block ``i``'s ``feature_resuse_mlp`` is the feature hook's
    ``mlps.<i>``; ``relation_reuse_conv`` is the relation hook's ``conv``.
    The widened ``norm2`` / ``mlp.fc1`` (D + 48 inputs) keep their names.
    """
    keys = list(keys)
    table: list[tuple[str, str]] = []
    for index, name in enumerate(DVT_TRANSFORMERS):
        backbone = "backbone.model." if index == 0 else f"stages.{index}.backbone.model."
        blocks = sorted({int(m.group(2)) for k in keys if (m := _DVT_FEATURE_REUSE.match(k)) and m.group(1) == name})
        relation = any(k.startswith(f"{name}.relation_reuse_conv.") for k in keys)
        hook = 0
        if blocks:
            table += [
                (f"{name}.blocks.{b}.feature_resuse_mlp.", f"stages.{index}.hooks.{hook}.mlps.{b}.") for b in blocks
            ]
            hook += 1
        if relation:
            table.append((f"{name}.relation_reuse_conv.", f"stages.{index}.hooks.{hook}.conv."))
        table.append((f"{name}.", backbone))
    return tuple(table)


@dataclass(frozen=True)
class AuthorsFormat:
    """One method's released checkpoints: the name in messages, the entries kept beside the weights, the key table."""

    name: str  # as the paper writes it, for messages
    metadata_keys: tuple[str, ...]  # entries beside the weights, copied into the sidecar JSON under their own names
    # the checkpoint's keys -> its (authors' prefix, dynvit prefix) table, first match wins
    key_prefixes: Callable[[Iterable[str]], tuple[tuple[str, str], ...]] = lambda keys: AUTHORS_KEY_PREFIXES
    position_tables: bool = True  # one shared backbone, its per-stage tables as pos_embed_list.N (mapped by shape)


AUTHORS_FORMATS = {
    "lfvit": AuthorsFormat("LF-ViT", ("flops", "anytime_classification", "budgeted_batch_classification")),
    # CF-ViT's release names its per-stage GFLOPs list 'flop', not 'flops'
    "cfvit": AuthorsFormat("CF-ViT", ("flop", "anytime_classification", "budgeted_batch_classification")),
    # DVT's weights are under 'model_state_dict'; each transformer keeps its own pos_embed
    "dvt": AuthorsFormat(
        "DVT",
        ("flops", "anytime_classification", "dynamic_threshold", "budgeted_batch_classification"),
        key_prefixes=dvt_key_prefixes,
        position_tables=False,
    ),
}
LFVIT_METADATA_KEYS = AUTHORS_FORMATS["lfvit"].metadata_keys


def _authors_format(method: str) -> AuthorsFormat:
    if method not in AUTHORS_FORMATS:
        raise CheckpointError(f"unknown checkpoint format {method!r}; known: {', '.join(AUTHORS_FORMATS)}")
    return AUTHORS_FORMATS[method]


def _square_grid(table: Tensor, key: str) -> int:
    if table.ndim != 3 or table.shape[0] != 1:
        raise CheckpointError(f"{key} has shape {tuple(table.shape)}; expected (1, 1 + rows*cols, width)")
    side = math.isqrt(table.shape[1] - 1)
    if side * side != table.shape[1] - 1:
        raise CheckpointError(f"{key} has {table.shape[1] - 1} patch positions, not a square grid")
    return side


def convert_authors_state_dict(state_dict: Mapping[str, Tensor], method: str = "lfvit") -> StateDict:
    """Rename the authors' LF-ViT, CF-ViT or DVT state dict (``method`` a key of :data:`AUTHORS_FORMATS`)
    to dynvit pipeline keys, through the format's prefix table.

    Widths, depth, patch size and grids come from the tensors, so any
    variant converts (224/112 with 14x14 and 7x7 grids, 288/144 with
    18x18 and 9x9...). LF-ViT/CF-ViT: the largest position table becomes
    the backbone's own; the others become
    ``backbone.stage_pos_embed.<rows>x<cols>``. DVT: each transformer's
    tensors go to its stage's backbone and hooks (:func:`dvt_key_prefixes`).
    """
    fmt = _authors_format(method)
    name = fmt.name
    state = state_dict_from(state_dict, f"{name} state dict")
    prefixes = fmt.key_prefixes(state)
    out: StateDict = {}
    tables: dict[int, tuple[str, Tensor]] = {}
    unknown = []
    for key, value in state.items():
        if fmt.position_tables and _AUTHORS_POSITION.fullmatch(key):
            side = _square_grid(value, key)
            if side in tables:
                raise CheckpointError(f"{tables[side][0]} and {key} both hold a {side}x{side} position table")
            tables[side] = (key, value)
            continue
        for old, new in prefixes:
            if key == old or (old.endswith(".") and key.startswith(old)):
                out[new + key[len(old) :]] = value
                break
        else:
            unknown.append(key)
    if unknown:
        raise CheckpointError(
            f"keys that are not part of the {name} layout: {summarise_keys(unknown)}; "
            f"is this the authors' {name} checkpoint?"
        )
    if not fmt.position_tables:
        return out
    if len(tables) < 2:
        raise CheckpointError(
            f"the authors' {name} checkpoints have one position table per stage (pos_embed_list.0/1), "
            f"found {len(tables)}"
        )
    full = max(tables)
    for side, (_, table) in tables.items():
        key = "backbone.model.pos_embed" if side == full else f"backbone.stage_pos_embed.{side}x{side}"
        out[key] = table
    return out


def convert_lfvit_state_dict(state_dict: Mapping[str, Tensor]) -> StateDict:
    """:func:`convert_authors_state_dict` for the authors' LF-ViT checkpoints."""
    return convert_authors_state_dict(state_dict, "lfvit")


def convert_cfvit_state_dict(state_dict: Mapping[str, Tensor]) -> StateDict:
    """:func:`convert_authors_state_dict` for the authors' CF-ViT checkpoints (same layout as LF-ViT's)."""
    return convert_authors_state_dict(state_dict, "cfvit")


def _jsonable(value: Any) -> Any:
    if isinstance(value, Tensor):
        if value.is_floating_point() and value.dtype != torch.float64:
            # the shortest decimal of each value at its own precision: 79.8, not 79.80000305175781
            return value.float().numpy().astype(str).astype(float).tolist()
        return value.tolist()
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if value is None or isinstance(value, bool | int | float | str):
        return value
    return repr(value)


@dataclass
class AuthorsImport:
    """What :func:`import_authors_checkpoint` wrote and what it found in the source."""

    weights: Path
    sidecar: Path
    num_tensors: int
    embed_dim: int
    depth: int
    patch_size: int
    num_classes: int
    grids: list[int]  # side of each stage's square grid, stage 1 first
    metadata_keys: list[str]
    method: str = "lfvit"  # key of AUTHORS_FORMATS
    patch_sizes: list[int] = field(default_factory=list)  # each stage's patch (DVT's differ); empty: patch_size

    @property
    def image_size(self) -> int:
        return self.grids[-1] * (self.patch_sizes[-1] if self.patch_sizes else self.patch_size)


LFViTImport = AuthorsImport  # the name before CF-ViT shared it


def import_authors_checkpoint(
    src: PathLike, dst: PathLike, method: str = "lfvit", check: Callable[[StateDict], None] | None = None
) -> AuthorsImport:
    """Convert the authors' LF-ViT, CF-ViT or DVT checkpoint ``src`` into a dynvit pipeline checkpoint ``dst``.

    ``method`` is a key of :data:`AUTHORS_FORMATS` ("lfvit", "cfvit", "dvt").
    ``dst`` (.safetensors) gets the weights; ``dst`` with ``.json`` a sidecar
    with the shapes found and the authors' extra entries (LF-ViT's
    ``flops``, CF-ViT's ``flop``, the anytime and budgeted-batch results).
    ``check`` sees the converted state dict before anything is written (the
    command line loads it strictly into the recipe's pipeline), so a refused
    import leaves ``dst`` as it was. Both files are written atomically.
    """
    fmt = _authors_format(method)
    src, dst = Path(src), Path(dst)
    if dst.suffix != ".safetensors":
        raise CheckpointError(f"the imported checkpoint is written as safetensors; name it *.safetensors, not {dst}")
    checkpoint = read_checkpoint(src)
    state = convert_authors_state_dict(checkpoint, method)
    blocks = {int(m.group(1)) for k in state if (m := re.match(r"backbone\.model\.blocks\.(\d+)\.", k))}
    patch = state["backbone.model.patch_embed.proj.weight"]
    head = state.get("backbone.model.head.weight")
    grids = sorted(int(k.rsplit(".", 1)[1].split("x")[0]) for k in state if k.startswith("backbone.stage_pos_embed."))
    grids.append(_square_grid(state["backbone.model.pos_embed"], "pos_embed"))
    patch_sizes = [int(patch.shape[-1])] * len(grids)
    # stages with their own backbone (DVT), in stage order
    own = sorted(int(m.group(1)) for k in state if (m := re.fullmatch(r"stages\.(\d+)\.backbone\.model\.pos_embed", k)))
    for index in own:
        grids.append(_square_grid(state[f"stages.{index}.backbone.model.pos_embed"], f"stage {index} pos_embed"))
        patch_sizes.append(int(state[f"stages.{index}.backbone.model.patch_embed.proj.weight"].shape[-1]))
    extra = {k: _jsonable(checkpoint[k]) for k in fmt.metadata_keys if k in checkpoint}
    ignored = sorted(k for k in checkpoint if k not in (*STATE_DICT_ENTRIES, *fmt.metadata_keys))
    summary = AuthorsImport(
        weights=dst,
        sidecar=dst.with_suffix(".json"),
        num_tensors=len(state),
        embed_dim=int(patch.shape[0]),
        depth=len(blocks),
        patch_size=int(patch.shape[-1]),
        num_classes=int(head.shape[0]) if head is not None else 0,
        grids=grids,
        metadata_keys=sorted(extra),
        method=method,
        patch_sizes=patch_sizes,
    )
    info = {
        "format": f"dynvit pipeline weights, imported from the authors' {fmt.name} checkpoint",
        "source": str(src),
        "embed_dim": summary.embed_dim,
        "depth": summary.depth,
        "patch_size": summary.patch_size,
        **({"patch_sizes": patch_sizes} if len(set(patch_sizes)) > 1 else {}),
        "num_classes": summary.num_classes,
        "grids": [f"{g}x{g}" for g in grids],
        "image_size": summary.image_size,
        "ignored_entries": ignored,
        **extra,
    }
    if check is not None:
        check(state)
    source = fmt.name.lower()  # "lf-vit", "cf-vit"
    save_pipeline_weights(state, dst, metadata={"source": source, "image_size": str(summary.image_size)})
    text = json.dumps(info, indent=2) + "\n"
    atomic_write(summary.sidecar, lambda tmp: tmp.write_text(text))
    return summary


def import_lfvit(src: PathLike, dst: PathLike, check: Callable[[StateDict], None] | None = None) -> AuthorsImport:
    """:func:`import_authors_checkpoint` for the authors' LF-ViT checkpoints."""
    return import_authors_checkpoint(src, dst, "lfvit", check)


def import_cfvit(src: PathLike, dst: PathLike, check: Callable[[StateDict], None] | None = None) -> AuthorsImport:
    """:func:`import_authors_checkpoint` for the authors' CF-ViT checkpoints."""
    return import_authors_checkpoint(src, dst, "cfvit", check)


def import_dvt(src: PathLike, dst: PathLike, check: Callable[[StateDict], None] | None = None) -> AuthorsImport:
    """:func:`import_authors_checkpoint` for the authors' DVT checkpoints."""
    return import_authors_checkpoint(src, dst, "dvt", check)


def load_checkpoint_weights(pipe: nn.Module, path: str | Path, ema: bool = False, strict: bool = True) -> nn.Module:
    """Load a checkpoint's weights into ``pipe``.

    ``path`` is a checkpoint folder, a run's output folder (``best`` if it
    exists, else ``last``) or a weights file; ``ema=True`` loads the EMA
    weights of a folder. Reading is :func:`dynvit.weights.load_pipeline_weights`.
    """
    load_pipeline_weights(pipe, run_checkpoint(path), strict=strict, ema=ema)
    return pipe
