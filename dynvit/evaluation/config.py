"""Recipe schema of the ``eval`` section.

Defined in :mod:`dynvit.recipe_sections` (the recipe layer owns the schema,
so loading a recipe imports no engine); re-exported here.
"""

from __future__ import annotations

from dynvit.recipe_sections import EVAL_CHECKS, EvalConfig

__all__ = ["EVAL_CHECKS", "EvalConfig"]
