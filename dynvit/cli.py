"""The ``dynvit`` command: one subcommand per module in ``dynvit.commands``.

Each command module defines ``HELP``, ``add_arguments(parser)`` and
``run(args) -> int``; a module that fails to import is reported, not hidden.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Sequence

from dynvit.errors import DynvitError, one_line

# subcommand -> module in dynvit.commands
COMMANDS: dict[str, str] = {
    "plugins": "plugins",
    "show": "show",
    "train": "train",
    "eval": "evaluate",
    "flops": "flops",
    "import-lfvit": "import_lfvit",
    "import-cfvit": "import_cfvit",
    "import-dvt": "import_dvt",
    "data": "data",
    "quickstart": "quickstart",
    "export": "export",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dynvit",
        description="Dynamic inference for vision transformers.",
        epilog=f"{DEBUG_FLAG} (anywhere) or {DEBUG_ENV}=1: show the full traceback of any error, for bug reports",
    )
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


DEBUG_FLAG = "--debug"
DEBUG_ENV = "DYNVIT_DEBUG"


def main(argv: Sequence[str] | None = None) -> int:
    """Run a command. Errors a user can fix print as one ``error: ...`` line and exit 2; a bug exits 1.

    ``--debug`` (anywhere on the line) or ``DYNVIT_DEBUG=1`` lets every exception through with its traceback.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = DEBUG_FLAG in argv or os.environ.get(DEBUG_ENV, "") not in ("", "0")
    argv = [a for a in argv if a != DEBUG_FLAG]
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
    except KeyboardInterrupt:
        if debug:
            raise
        print("interrupted", file=sys.stderr)
        return 130
    except (DynvitError, OSError) as exc:
        if debug:
            raise
        print(f"error: {one_line(exc)}", file=sys.stderr)
        return 2
    except Exception as exc:
        if debug:
            raise
        print(
            f"error: unexpected {type(exc).__name__}: {one_line(exc)}. This is a bug in dynvit or a plugin: "
            f"rerun with {DEBUG_FLAG} (or {DEBUG_ENV}=1) for the traceback and report it",
            file=sys.stderr,
        )
        return 1


if __name__ == "__main__":
    sys.exit(main())
