"""Subcommands of the ``dynvit`` command line.

Each module defines ``HELP``, ``add_arguments(parser)`` and ``run(args) -> int``.
A :class:`~dynvit.recipe.RecipeError` raised by a command is printed by the
command line as ``error: ...`` with exit status 2, so commands just load.
"""

from __future__ import annotations

import argparse


def add_recipe_arguments(parser: argparse.ArgumentParser, example: str = "model.selector.region=4") -> None:
    """The ``RECIPE [key=value ...]`` arguments every recipe-driven command takes."""
    parser.add_argument("recipe", help="recipe file, or the name of a bundled recipe (e.g. lfvit_deit_s, quickstart)")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help=f"dotlist overrides, e.g. {example}")
