"""Every recipe shipped in configs/ loads as the CLI loads it (`load_recipe(path, [], STAGES)`),
and `distillery run all` on it could start from an empty data root: each stage it runs reads only
stages the recipe runs before it. configs/recipe.yaml (the real recipe, `make pipeline
TEACHER=…`) is loaded by no other test."""
from __future__ import annotations

import dataclasses
import glob
import os

import pytest
import yaml

from pipeline.config import absolute_if_local, load_recipe
from stages import STAGES

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RECIPES = sorted(glob.glob(os.path.join(REPO, "configs", "*.yaml")))


def test_the_shipped_recipes_are_found():
    names = {os.path.basename(p) for p in RECIPES}
    assert {"recipe.yaml", "tiny.yaml"} <= names


@pytest.mark.parametrize("path", RECIPES, ids=[os.path.basename(p) for p in RECIPES])
def test_recipe_loads_with_known_stages_in_runnable_order(path):
    recipe = load_recipe(path, [], STAGES)
    with open(path, encoding="utf-8") as f:
        raw = yaml.safe_load(f)
    # The stages run: the recipe's list, else its sections, in pipeline order.
    listed = raw.get("stages") or [name for name in raw if name in STAGES]
    assert recipe.stages and set(recipe.stages) == set(listed)
    assert recipe.stages == sorted(recipe.stages, key=list(STAGES).index)
    for i, name in enumerate(recipe.stages):
        assert name in STAGES
        stage = STAGES[name]
        # what this config reads (evaluate reads sft / kd / redi / opd only when it names them)
        reads = stage.uses(recipe.configs[name]) if stage.uses else stage.reads
        missing = [r for r in stage.reads if r in reads and r not in recipe.stages[:i]]
        assert not missing, f"{os.path.basename(path)}: {name} reads {missing}, not run before it"
    # Every section's keys became its stage's config (nothing dropped on the way).
    for name in listed:
        config = recipe.configs[name]
        assert isinstance(config, STAGES[name].config)
        for key, value in (raw.get(name) or {}).items():
            # (a local model folder is made absolute: Ray Train workers run elsewhere)
            expected = absolute_if_local(value) if isinstance(value, str) else value
            assert getattr(config, key) == expected, (name, key)
    assert set(recipe.resources) == set(STAGES)
    assert all(dataclasses.is_dataclass(r) for r in recipe.resources.values())
