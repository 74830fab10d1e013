"""``dynvit show``: the fully resolved recipe, bases and overrides applied."""

from __future__ import annotations

import argparse
import sys

from dynvit.recipe import RecipeError, load_recipe, recipe_to_yaml

HELP = "print a recipe with its bases and overrides applied"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("recipe", help="recipe file, or the name of a bundled recipe")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="dotlist overrides")


def run(args: argparse.Namespace) -> int:
    try:
        recipe = load_recipe(args.recipe, args.overrides)
    except RecipeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(recipe_to_yaml(recipe), end="")
    return 0
