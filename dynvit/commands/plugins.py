"""``dynvit plugins``: every registered plugin, grouped by stage kind."""

from __future__ import annotations

import argparse

from dynvit.registry import STAGE_KINDS, registry

HELP = "list the registered plugins of every stage kind"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--kind", choices=STAGE_KINDS, help="list only this stage kind")


def run(args: argparse.Namespace) -> int:
    kinds = [args.kind] if args.kind else STAGE_KINDS
    for kind in kinds:
        print(f"{kind}:")
        for name, cls in registry(kind).items():
            doc = (cls.__doc__ or "").strip().splitlines()[0] if cls.__doc__ else ""
            print(f"  {name:<20} {doc}")
    return 0
