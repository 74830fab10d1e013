"""The ``dynvit`` command: one subcommand per module in ``dynvit.commands``.

Each command module defines ``HELP``, ``add_arguments(parser)`` and
``run(args) -> int``; a module that fails to import is reported, not hidden.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from dynvit.recipe import RecipeError
from dynvit.registry import PluginError

# subcommand -> module in dynvit.commands
COMMANDS: dict[str, str] = {
    "plugins": "plugins",
    "show": "show",
    "train": "train",
    "eval": "evaluate",
    "flops": "flops",
    "import-lfvit": "import_lfvit",
    "data": "data",
    "quickstart": "quickstart",
    "export": "export",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dynvit", description="Dynamic inference for vision transformers.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, module_name in COMMANDS.items():
        try:
            module = importlib.import_module(f"dynvit.commands.{module_name}")
        except ModuleNotFoundError as exc:
            if exc.name == f"dynvit.commands.{module_name}":
                continue  # command not part of this build
            raise
        command = sub.add_parser(name, help=module.HELP, description=module.HELP)
        module.add_arguments(command)
        command.set_defaults(handler=module.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args, extras = parser.parse_known_args(argv)
    # key=value overrides may also follow options: `dynvit eval RECIPE --checkpoint PATH key=value`
    if extras and hasattr(args, "overrides") and all("=" in e and not e.startswith("-") for e in extras):
        args.overrides = [*args.overrides, *extras]
    elif extras:
        parser.error(f"unrecognized arguments: {' '.join(extras)}")
    if getattr(args, "handler", None) is None:
        parser.print_help()
        return 2
    try:
        return int(args.handler(args) or 0)
    except (RecipeError, PluginError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
