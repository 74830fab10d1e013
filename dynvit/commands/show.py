"""``dynvit show``: the fully resolved recipe, bases and overrides applied."""

from __future__ import annotations

import argparse

from dynvit.commands import add_recipe_arguments
from dynvit.recipe import load_recipe, recipe_to_yaml

HELP = "print a recipe with its bases and overrides applied"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_recipe_arguments(parser)


def run(args: argparse.Namespace) -> int:
    recipe = load_recipe(args.recipe, args.overrides)
    print(recipe_to_yaml(recipe), end="")
    return 0
