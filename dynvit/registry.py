"""Plugin registries: one per stage kind, looked up by name or dotted path.

Built-in plugins and third-party packages both register through the
``dynvit.plugins`` entry-point group, so the core never imports a concrete
plugin by name. A recipe may also name a class directly as
``package.module:ClassName``; such a class needs no registration at all.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import inspect
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

from torch import nn

from dynvit.errors import DynvitError

ENTRY_POINT_GROUP = "dynvit.plugins"

STAGE_KINDS = (
    "downsampler",
    "backbone",
    "exit_policy",
    "region_selector",
    "token_reuser",
    "fuser",
    "encoder_hook",
    "token_reducer",
    "loss",
)

T = TypeVar("T", bound=type)


class PluginError(DynvitError, LookupError):
    """A plugin name that cannot be resolved, or a plugin built with bad arguments."""


class Registry:
    """Name -> class table for one stage kind."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._classes: dict[str, type] = {}

    def register(self, name: str) -> Callable[[T], T]:
        """Class decorator: ``@registry("region_selector").register("ngca")``."""

        def decorator(cls: T) -> T:
            known = self._classes.get(name)
            if known is not None and known is not cls:
                raise PluginError(
                    f"{self.kind} plugin name {name!r} is taken by "
                    f"{known.__module__}.{known.__qualname__}; pick another name"
                )
            self._classes[name] = cls
            return cls

        return decorator

    def names(self) -> list[str]:
        load_entry_points()
        return sorted(self._classes)

    def items(self) -> list[tuple[str, type]]:
        load_entry_points()
        return sorted(self._classes.items())

    def get(self, name: str) -> type:
        """Resolve a registered name or a ``module:Class`` dotted path."""
        if ":" in name:
            return _import_dotted(name, self.kind)
        load_entry_points()
        try:
            return self._classes[name]
        except KeyError:
            raise PluginError(
                f"unknown {self.kind} plugin {name!r}; registered: "
                f"{', '.join(self.names()) or '(none)'}; "
                "or give a dotted path such as 'my_pkg.module:MyClass'"
            ) from None

    def build(self, config: Mapping[str, Any], **context: Any) -> Any:
        """Instantiate ``config['type']`` with the other keys as arguments.

        ``context`` holds values the pipeline knows (embedding width, image
        sizes); each is passed only to plugins whose constructor accepts it.
        """
        if "type" not in config:
            raise PluginError(f"{self.kind} section needs a 'type' key; registered: {', '.join(self.names())}")
        cls = self.get(str(config["type"]))
        kwargs = {k: v for k, v in config.items() if k != "type"}
        params = constructor_parameters(cls)
        accepts_any = any(p.kind is p.VAR_KEYWORD for p in params.values())
        for key, value in context.items():
            if key in params or accepts_any:
                kwargs.setdefault(key, value)
        return cls(**kwargs)


def constructor_parameters(cls: type) -> dict[str, inspect.Parameter]:
    """The keyword parameters a plugin's constructor takes (``self`` dropped)."""
    if cls.__init__ in (object.__init__, nn.Module.__init__):
        return {}  # no constructor of its own: takes no arguments
    params = dict(inspect.signature(cls.__init__).parameters)
    params.pop("self", None)
    params = {k: p for k, p in params.items() if p.kind is not p.VAR_POSITIONAL}
    return params


def _import_dotted(path: str, kind: str) -> type:
    module_name, _, attr = path.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise PluginError(f"cannot import module {module_name!r} for {kind} plugin {path!r}: {exc}") from exc
    try:
        return getattr(module, attr)
    except AttributeError:
        raise PluginError(f"module {module_name!r} has no attribute {attr!r} (from {kind} plugin {path!r})") from None


_REGISTRIES = {kind: Registry(kind) for kind in STAGE_KINDS}
_entry_points_loaded = False


def registry(kind: str) -> Registry:
    """The registry of one stage kind."""
    try:
        return _REGISTRIES[kind]
    except KeyError:
        raise PluginError(f"unknown stage kind {kind!r}; kinds: {', '.join(STAGE_KINDS)}") from None


def register(kind: str, name: str) -> Callable[[T], T]:
    """Shorthand for ``registry(kind).register(name)``."""
    return registry(kind).register(name)


def load_entry_points(force: bool = False) -> None:
    """Import every module advertised under the ``dynvit.plugins`` entry-point group."""
    global _entry_points_loaded
    if _entry_points_loaded and not force:
        return
    _entry_points_loaded = True
    for entry_point in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        try:
            entry_point.load()
        except Exception as exc:  # say which package broke, not just the traceback
            raise PluginError(
                f"plugin package {entry_point.name!r} ({entry_point.value}) failed to import: {exc}"
            ) from exc
