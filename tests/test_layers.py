"""Layering: the recipe layer imports no engine, and neither engine (training, evaluation) imports the other.

Checked twice: by importing in a fresh interpreter and reading ``sys.modules``
(what actually loads, through any chain of modules), and by reading every
``import`` statement of the engines' sources (which also sees imports inside
functions, which run only when called).
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

import dynvit

ROOT = Path(dynvit.__file__).parent
TRAINING, EVALUATION = "dynvit.training", "dynvit.evaluation"


def loaded_after(code: str) -> set[str]:
    """The ``dynvit.*`` modules a fresh interpreter holds after running ``code``."""
    probe = f"{code}\nimport json, sys\nprint(json.dumps(sorted(m for m in sys.modules if m.startswith('dynvit'))))"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout
    return set(json.loads(out.splitlines()[-1]))


def within(modules: set[str], package: str) -> set[str]:
    return {m for m in modules if m == package or m.startswith(f"{package}.")}


@pytest.mark.parametrize(
    "code",
    [
        "import dynvit.recipe",
        # building the schema and checking the values read the data, train and eval sections
        "from dynvit.recipe import load_recipe; load_recipe('quickstart')",
    ],
)
def test_the_recipe_layer_loads_no_engine(code):
    loaded = loaded_after(code)
    assert not within(loaded, TRAINING) and not within(loaded, EVALUATION), sorted(loaded)


def test_evaluation_loads_no_training():
    loaded = loaded_after("import dynvit.evaluation.runner; import dynvit.recipe as r; r.load_recipe('quickstart')")
    assert within(loaded, EVALUATION) and not within(loaded, TRAINING), sorted(loaded)


def test_training_loads_no_evaluation():
    loaded = loaded_after("import dynvit.training.trainer; import dynvit.recipe as r; r.load_recipe('quickstart')")
    assert within(loaded, TRAINING) and not within(loaded, EVALUATION), sorted(loaded)


def imported_modules(path: Path) -> set[str]:
    """Every module an ``import`` statement of ``path`` names, at any depth (absolute imports only)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names.add(node.module)
    return names


@pytest.mark.parametrize(
    ("sources", "forbidden"),
    [
        ([ROOT / "recipe.py", ROOT / "recipe_sections.py"], (TRAINING, EVALUATION)),
        (sorted((ROOT / "evaluation").glob("*.py")), (TRAINING,)),
        (sorted((ROOT / "training").glob("*.py")), (EVALUATION,)),
        ([ROOT / "commands" / "export.py"], (TRAINING,)),  # load_checkpoint_weights lives in dynvit.weights
    ],
)
def test_no_import_statement_crosses_a_layer(sources, forbidden):
    for path in sources:
        crossing = {m for m in imported_modules(path) for f in forbidden if m == f or m.startswith(f"{f}.")}
        assert not crossing, f"{path.relative_to(ROOT.parent)} imports {sorted(crossing)}"


def test_the_engines_config_modules_re_export_the_recipe_sections():
    from dynvit import recipe_sections
    from dynvit.evaluation import config as eval_config
    from dynvit.training import config as train_config

    for name in ("DataConfig", "TrainConfig", "MIXED_PRECISION", "DATA_CHECKS", "TRAIN_CHECKS", "IMAGENET_MEAN"):
        assert getattr(train_config, name) is getattr(recipe_sections, name)
    for name in ("EvalConfig", "EVAL_CHECKS"):
        assert getattr(eval_config, name) is getattr(recipe_sections, name)
