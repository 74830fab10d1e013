"""Recipes: YAML files that name the stages of a pipeline and how to train it.

A recipe may extend another (``base: other.yaml``, resolved next to the
recipe file, then among the recipes shipped with dynvit) and takes
OmegaConf dotlist overrides (``model.selector.type=random``). Everything is
validated at load time, so a typo fails before any model is built, with a
message that names the key and the file it came from.
"""

from __future__ import annotations

import functools
import importlib.resources
import typing
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, make_dataclass
from pathlib import Path
from typing import Any, Optional

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from dynvit.errors import DynvitError
from dynvit.registry import PluginError, constructor_parameters, registry

# recipe section -> stage kind of the plugin it names
PLUGIN_SECTIONS: dict[str, str] = {
    "model.backbone": "backbone",
    "model.downsampler": "downsampler",
    "model.selector": "region_selector",
    "model.fuser": "fuser",
    "model.reuser": "token_reuser",
    "model.exit": "exit_policy",
    "model.reduction": "token_reducer",
    "loss": "loss",
}

# keys of one entry of a ``model.stages`` list -> the stage kind of the plugin each names
STAGE_KEYS: dict[str, str] = {
    "backbone": "backbone",  # the stage's own backbone; without it the stage runs model.backbone
    "downsampler": "downsampler",
    "selector": "region_selector",
    "fuser": "fuser",
    "reuser": "token_reuser",
    "exit": "exit_policy",
}
HOOKS_KEY = "hooks"  # a list of encoder_hook plugins

# the two-stage shorthand (model.stages: 2): which top-level section serves which stage
SHORTHAND_STAGES: tuple[dict[str, str], ...] = (
    {"downsampler": "model.downsampler", "exit": "model.exit"},
    {"selector": "model.selector", "fuser": "model.fuser", "reuser": "model.reuser"},
)

# constructor arguments the pipeline supplies; a recipe does not set them
CONTEXT_ARGUMENTS: dict[str, tuple[str, ...]] = {
    "backbone": ("image_size", "stage_image_sizes"),
    "fuser": ("embed_dim",),
    "token_reuser": ("embed_dim",),
    "encoder_hook": ("backbone", "previous_backbone"),
}


@dataclass(frozen=True)
class StageSections:
    """The recipe sections one stage is built from: stage key -> (dotted recipe key, section)."""

    plugins: dict[str, tuple[str, Any]]
    hooks: list[tuple[str, Any]]


def stage_sections(model: DictConfig) -> list[StageSections]:
    """Every stage's plugin sections in order, the one- and two-stage shorthands expanded.

    ``model.stages: 1`` is one whole-image stage; ``2`` is LF-ViT's shape
    from the top-level sections; a list names each stage's sections itself.
    """
    stages = model.stages
    if stages == 1:
        return [StageSections({}, [])]
    if isinstance(stages, int):
        return [
            StageSections(
                {key: (dotted, _section(model, dotted.removeprefix("model."))) for key, dotted in s.items()}, []
            )
            for s in SHORTHAND_STAGES
        ]
    result = []
    for i, stage in enumerate(stages):
        prefix = f"model.stages.{i}"
        plugins = {key: (f"{prefix}.{key}", stage[key]) for key in STAGE_KEYS if stage.get(key) is not None}
        hooks = [(f"{prefix}.{HOOKS_KEY}.{j}", h) for j, h in enumerate(stage.get(HOOKS_KEY) or [])]
        result.append(StageSections(plugins, hooks))
    return result


# key -> (is the value valid?, what it must be); checked when a recipe loads (None always passes)
ValueCheck = tuple[Callable[[Any], bool], str]


def at_least(low: float) -> ValueCheck:
    return (lambda v: v >= low, f">= {low}")


def positive() -> ValueCheck:
    return (lambda v: v > 0, "> 0")


def fraction(open_low: bool = False, open_high: bool = False) -> ValueCheck:
    low, high = "(" if open_low else "[", ")" if open_high else "]"

    def valid(v: float) -> bool:
        return (v > 0 if open_low else v >= 0) and (v < 1 if open_high else v <= 1)

    return (valid, f"in {low}0, 1{high}")


def one_of(*options: str) -> ValueCheck:
    return (lambda v: v in options, f"one of {', '.join(options)}")


class RecipeError(DynvitError, ValueError):
    """A recipe that cannot be loaded; the message names the file and key."""


class RecipeWarning(UserWarning):
    """Something in a recipe that was adjusted rather than refused."""


def _plugin(type_name: str, **kwargs: Any) -> dict[str, Any]:
    return field(default_factory=lambda: {"type": type_name, **kwargs})


@dataclass
class ModelConfig:
    """The stages of the pipeline; each plugin section is ``{type: NAME, **arguments}``."""

    image_size: int = 224
    # 1: plain backbone at full resolution (baselines); 2: LF-ViT's shape from the sections below;
    # or a list of stages, each a mapping of the STAGE_KEYS it uses (see stage_sections)
    stages: Any = 2
    backbone: dict[str, Any] = _plugin("timm_vit")  # every stage's backbone unless the stage names its own
    downsampler: dict[str, Any] = _plugin("bilinear")
    selector: dict[str, Any] = _plugin("full_image")
    fuser: dict[str, Any] = _plugin("none")
    reuser: dict[str, Any] = _plugin("none")
    exit: dict[str, Any] = _plugin("confidence")
    # token reduction (evit, tome) inside the blocks of the stages its ``stage`` key names (-1: the last)
    reduction: dict[str, Any] = _plugin("none")


@functools.cache
def recipe_schema() -> type:
    """The whole recipe as a structured-config dataclass; ``base`` is consumed while loading.

    Built on first use: the ``data``, ``train`` and ``eval`` sections live in
    :mod:`dynvit.recipe_sections`, which imports this module's value checks.
    """
    from dynvit.recipe_sections import DataConfig, EvalConfig, TrainConfig

    return make_dataclass(
        "RecipeSchema",
        [
            ("base", Optional[str], None),  # noqa: UP045 - evaluated at run time by OmegaConf
            ("model", ModelConfig, field(default_factory=ModelConfig)),
            ("loss", dict[str, Any], _plugin("ce")),
            ("data", DataConfig, field(default_factory=DataConfig)),
            ("train", TrainConfig, field(default_factory=TrainConfig)),
            ("eval", EvalConfig, field(default_factory=EvalConfig)),
        ],
    )


def bundled_recipes_dir() -> Path:
    """The recipes shipped with dynvit."""
    return Path(str(importlib.resources.files("dynvit.recipes")))


def bundled_recipe_names() -> list[str]:
    root = bundled_recipes_dir()
    return sorted(str(p.relative_to(root).with_suffix("")) for p in root.rglob("*.yaml"))


def resolve_recipe_path(name: str | Path, relative_to: Path | None = None) -> Path:
    """A recipe file by path, by path next to ``relative_to``, or by bundled name."""
    candidates = [Path(name)]
    if relative_to is not None:
        candidates.insert(0, relative_to / name)
    root = bundled_recipes_dir()
    candidates += [root / name, root / f"{name}.yaml"]
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    where = f" (looked next to {relative_to} too)" if relative_to else ""
    raise RecipeError(
        f"recipe file not found: {name}{where}; give a path to a YAML file or one of the "
        f"bundled recipes: {', '.join(bundled_recipe_names())}"
    )


def _read_layers(path: Path, chain: tuple[Path, ...] = ()) -> list[tuple[str, DictConfig]]:
    """The file and its bases as (source, config) layers, outermost base first."""
    path = path.resolve()
    if path in chain:
        cycle = " -> ".join(str(p) for p in (*chain, path))
        raise RecipeError(f"recipe bases form a cycle: {cycle}")
    try:
        layer = OmegaConf.load(path)
    except OmegaConfBaseException as exc:
        raise RecipeError(f"{path}: not a valid recipe file: {exc}") from exc
    except Exception as exc:  # yaml.YAMLError and friends
        raise RecipeError(f"{path}: cannot parse YAML: {exc}") from exc
    if not isinstance(layer, DictConfig):
        raise RecipeError(f"{path}: a recipe must be a mapping at the top level")
    if len(layer) == 0:
        raise RecipeError(
            f"{path}: the recipe is empty; start from a bundled recipe with 'base: NAME' "
            "(lfvit_deit_s, deit_s, quickstart, ...; `dynvit show NAME` prints one) and set what differs"
        )
    layers: list[tuple[str, DictConfig]] = []
    base = layer.pop("base", None)
    if base is not None:
        layers += _read_layers(resolve_recipe_path(str(base), path.parent), (*chain, path))
    layers.append((str(path), layer))
    return layers


def _section(config: DictConfig, dotted: str) -> Any:
    return OmegaConf.select(config, dotted, default=None)


def _drop_keys_of_replaced_plugins(merged: DictConfig, layer: DictConfig, source: str) -> None:
    """A layer that switches a section to another plugin drops the arguments the new one does not take.

    This is what makes ``model.selector.type=random`` a one-word ablation:
    the region size carries over, NGCA-only arguments do not.
    """
    for dotted, kind in PLUGIN_SECTIONS.items():
        new = _section(layer, dotted)
        old = _section(merged, dotted)
        if not isinstance(new, DictConfig) or "type" not in new or not isinstance(old, DictConfig):
            continue
        if old.get("type") == new["type"]:
            continue
        try:
            params = constructor_parameters(registry(kind).get(str(new["type"])))
        except PluginError as exc:
            raise RecipeError(f"{source}: {dotted}.type: {exc}") from None
        if any(p.kind is p.VAR_KEYWORD for p in params.values()):
            continue
        dropped = [k for k in old if k != "type" and k not in params and k not in new]
        if dropped:
            warnings.warn(
                f"{source}: {dotted} switched from {old.get('type')!r} to {new['type']!r}; "
                f"dropping arguments it does not take: {', '.join(dropped)}",
                RecipeWarning,
                stacklevel=5,
            )
            with _writable(merged):
                for key in dropped:
                    del old[key]


class _writable:
    def __init__(self, config: DictConfig) -> None:
        self.config = config

    def __enter__(self) -> None:
        self.struct = OmegaConf.is_struct(self.config)
        OmegaConf.set_struct(self.config, False)

    def __exit__(self, *exc: object) -> None:
        OmegaConf.set_struct(self.config, self.struct)


def _merge(merged: DictConfig, layer: DictConfig, source: str) -> DictConfig:
    _drop_keys_of_replaced_plugins(merged, layer, source)
    try:
        return typing.cast(DictConfig, OmegaConf.merge(merged, layer))
    except OmegaConfBaseException as exc:
        key = getattr(exc, "full_key", None) or "?"
        reason = str(exc).splitlines()[0]
        raise RecipeError(f"{source}: {key}: {reason}") from None


def _merge_or_update(merged: DictConfig, layer: DictConfig, source: str) -> DictConfig:
    """:func:`_merge`, except that a one-key override through a list (``model.stages.0.exit.threshold=0.3``)
    updates that list item: a merge would read the index as a mapping key and refuse."""
    path, node = [], layer
    while OmegaConf.is_dict(node) and len(node) == 1:
        (name,) = node.keys()
        path.append(str(name))
        node = node[name]
    through_list = any(OmegaConf.is_list(_section(merged, ".".join(path[:i]))) for i in range(1, len(path)))
    if not through_list:
        return _merge(merged, layer, source)
    key = ".".join(path)
    try:
        with _writable(merged):
            OmegaConf.update(merged, key, node, merge=True)
    except (OmegaConfBaseException, ValueError, IndexError, KeyError) as exc:
        raise RecipeError(f"{source}: {key}: {str(exc).splitlines()[0]}") from None
    return merged


def _matches(value: Any, annotation: Any) -> bool:
    """A loose runtime check of a recipe value against a constructor annotation."""
    if annotation is Any or annotation is None:
        return True
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        return any(_matches(value, arg) for arg in typing.get_args(annotation))
    if annotation is type(None):
        return value is None
    if annotation is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if annotation in (str, bool):
        return isinstance(value, annotation)
    if origin in (list, tuple, typing.Sequence) or annotation in (list, tuple):
        return isinstance(value, (list, tuple)) or OmegaConf.is_list(value)
    return True


def _validate_plugin_section(config: DictConfig, dotted: str, kind: str, source: str) -> None:
    section = _section(config, dotted)
    if section is None:
        raise RecipeError(f"{source}: {dotted} is missing; it needs at least 'type: NAME'")
    if "type" not in section:
        raise RecipeError(
            f"{source}: {dotted} needs a 'type'; registered {kind} plugins: {', '.join(registry(kind).names())}"
        )
    try:
        cls = registry(kind).get(str(section["type"]))
    except PluginError as exc:
        raise RecipeError(f"{source}: {dotted}.type: {exc}") from None
    params = constructor_parameters(cls)
    context = CONTEXT_ARGUMENTS.get(kind, ())
    if not any(p.kind is p.VAR_KEYWORD for p in params.values()):
        accepted = [k for k in params if k not in context]
        for key in section:
            if key == "type":
                continue
            if key in context:
                raise RecipeError(f"{source}: {dotted}.{key} is set by the pipeline; remove it from the recipe")
            if key not in params:
                raise RecipeError(
                    f"{source}: {dotted}.{key}: unknown key for {kind} {section['type']!r}; "
                    f"accepted keys: {', '.join(accepted) or '(none)'}"
                )
    try:
        hints = typing.get_type_hints(cls.__init__)
    except Exception:
        hints = {}
    for name, param in params.items():
        if param.kind in (param.VAR_KEYWORD, param.VAR_POSITIONAL) or name in context:
            continue
        if name not in section:
            if param.default is param.empty:
                raise RecipeError(f"{source}: {dotted}.{name} is required by {kind} {section['type']!r} but not set")
            continue
        value = section[name]
        if name in hints and not _matches(value, hints[name]):
            raise RecipeError(
                f"{source}: {dotted}.{name}: expected {_type_name(hints[name])}, got {value!r} ({type(value).__name__})"
            )


def _type_name(annotation: Any) -> str:
    return getattr(annotation, "__name__", None) or str(annotation).replace("typing.", "")


def load_recipe(path: str | Path, overrides: Sequence[str] = ()) -> DictConfig:
    """Load, extend, override and validate a recipe.

    ``path`` is a YAML file or the name of a bundled recipe
    (``"lfvit_deit_s"``). ``overrides`` are OmegaConf dotlist strings.
    Raises :class:`RecipeError` naming the file and key on any problem,
    including geometry that only the built model knows (a region larger
    than the stage-1 grid, ``first_block`` beyond the depth): the pipeline
    is built once on the meta device (no memory, no weights read) to find out.
    """
    file = resolve_recipe_path(path)
    layers = _read_layers(file)
    if overrides:
        bad = [o for o in overrides if "=" not in o]
        if bad:
            raise RecipeError(f"overrides must look like key=value; got {', '.join(bad)}")
        try:
            layers += [("command-line overrides", OmegaConf.from_dotlist([o])) for o in overrides]
        except OmegaConfBaseException as exc:
            raise RecipeError(f"command-line overrides: {exc}") from None
    merged = OmegaConf.structured(recipe_schema())
    # which layer last set each plugin section, for messages
    section_source = {dotted: "defaults" for dotted in PLUGIN_SECTIONS}
    # the shorthand sections set at or after the layer that made model.stages a list (those are not read)
    unread: dict[str, str] = {}
    for source, layer in layers:
        merged = _merge_or_update(merged, layer, source)
        if OmegaConf.is_list(_section(layer, "model.stages")):
            unread = {}
        for dotted in PLUGIN_SECTIONS:
            if _section(layer, dotted) is not None:
                section_source[dotted] = source
                unread[dotted] = source
    missing = sorted(OmegaConf.missing_keys(merged))
    if missing:
        raise RecipeError(f"{file}: required values not set: {', '.join(missing)}")
    try:
        OmegaConf.resolve(merged)
    except OmegaConfBaseException as exc:
        raise RecipeError(f"{file}: {getattr(exc, 'full_key', '?')}: {str(exc).splitlines()[0]}") from None
    _check_stage_list(merged, unread, file)
    for dotted, kind in PLUGIN_SECTIONS.items():
        _validate_plugin_section(merged, dotted, kind, section_source[dotted])
    for sections in stage_sections(merged.model) if not isinstance(merged.model.stages, int) else ():
        for key, (dotted, _) in sections.plugins.items():
            _validate_plugin_section(merged, dotted, STAGE_KEYS[key], str(file))
        for dotted, _ in sections.hooks:
            _validate_plugin_section(merged, dotted, "encoder_hook", str(file))
    _check_values(merged, file)
    merged.base = None
    from dynvit.pipeline import check_buildable

    check_buildable(merged, source=str(file))
    return merged


def _check_stage_list(recipe: DictConfig, unread: dict[str, str], file: Path) -> None:
    """``model.stages`` is 1, 2 or a list of stage mappings that each say what they use.

    ``unread``: the plugin sections set (with the layer that set them) at or after the layer that made
    ``model.stages`` a list; the two-stage shorthand's sections among them would be silently ignored.
    """
    stages = recipe.model.stages
    if isinstance(stages, int) and not isinstance(stages, bool):
        if stages not in (1, 2):
            raise RecipeError(
                f"{file}: model.stages must be 1, 2 or a list of stages (each a mapping of "
                f"{', '.join([*STAGE_KEYS, HOOKS_KEY])}), got {stages}"
            )
        return
    if not OmegaConf.is_list(stages) or len(stages) == 0:
        raise RecipeError(f"{file}: model.stages must be 1, 2 or a non-empty list of stage mappings, got {stages!r}")
    shorthand = [dotted for stage in SHORTHAND_STAGES for dotted in stage.values()]
    set_here = [d for d in shorthand if d in unread]
    if set_here:
        raise RecipeError(
            f"{unread[set_here[0]]}: {', '.join(set_here)} is read only by the two-stage shorthand "
            f"(model.stages: 2); with a list of stages set it in the stage, e.g. model.stages.0.exit"
        )
    accepted = [*STAGE_KEYS, HOOKS_KEY]
    for i, stage in enumerate(stages):
        if not OmegaConf.is_dict(stage):
            raise RecipeError(f"{file}: model.stages.{i} must be a mapping of {', '.join(accepted)}, got {stage!r}")
        unknown = [k for k in stage if k not in accepted]
        if unknown:
            raise RecipeError(
                f"{file}: model.stages.{i}.{unknown[0]}: unknown stage key; accepted keys: {', '.join(accepted)}"
            )
        last = i == len(stages) - 1
        if last and stage.get("exit") is not None:
            raise RecipeError(f"{file}: model.stages.{i}.exit: the last stage has no exit policy; remove it")
        if not last and stage.get("exit") is None:
            raise RecipeError(
                f"{file}: model.stages.{i} needs an exit policy, e.g. exit: {{type: confidence, threshold: 0.8}}"
            )
        if stage.get(HOOKS_KEY) is not None and not OmegaConf.is_list(stage[HOOKS_KEY]):
            raise RecipeError(f"{file}: model.stages.{i}.{HOOKS_KEY} must be a list of {{type: NAME, ...}} mappings")


def _check_values(recipe: DictConfig, source: Path) -> None:
    """Every value with a range (``train.epochs >= 1``...) in range, so nothing fails deep inside a run."""
    from dynvit.recipe_sections import DATA_CHECKS, EVAL_CHECKS, TRAIN_CHECKS

    checks = {"model.image_size": (lambda v: v >= 1, "a positive number of pixels")}
    for section, table in (("data", DATA_CHECKS), ("train", TRAIN_CHECKS), ("eval", EVAL_CHECKS)):
        checks |= {f"{section}.{key}": check for key, check in table.items()}
    for key, (valid, expected) in checks.items():
        value = OmegaConf.select(recipe, key)
        if value is not None and not valid(value):
            raise RecipeError(f"{source}: {key}={value!r} is out of range; it must be {expected}")


def recipe_to_yaml(recipe: DictConfig) -> str:
    """The fully resolved recipe as YAML, as ``dynvit show`` prints it."""
    data = OmegaConf.to_container(recipe, resolve=True)
    assert isinstance(data, dict)
    data.pop("base", None)
    return OmegaConf.to_yaml(OmegaConf.create(data))
