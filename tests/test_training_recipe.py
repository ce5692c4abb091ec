"""Recipes (TOML / YAML), overrides, validation and the `r2r train` command line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from r2r_core.cli import build_parser, main
from r2r_core.training.recipe import Recipe, load_recipe

RECIPES = Path(__file__).resolve().parents[1] / "recipes"


@pytest.mark.parametrize("name", ["default.toml", "smoke.toml", "gpu.toml", "full.toml"])
def test_shipped_recipes_parse(name):
    recipe = load_recipe(RECIPES / name)
    assert recipe.data.paths and recipe.curation.num_negatives >= 1
    for stage in ("stage1", "stage2", "single_lora"):
        assert recipe.stage_config(stage).steps >= 1


def test_default_recipe_is_the_cheap_recipe():
    recipe = load_recipe(RECIPES / "default.toml")
    assert recipe.curation.num_negatives == 7 and recipe.curation.num_random_negatives == 1  # 6 hard + 1 random
    lora = recipe.train.lora
    assert (lora.r, lora.alpha, lora.dropout, lora.top_layers) == (16, 32, 0.05, 10)
    assert recipe.train.max_length == 192 and recipe.train.bce_weight > 0
    assert recipe.output.general_expert and recipe.output.warm_start
    assert sorted(lora.target_modules) == ["k_proj", "o_proj", "q_proj", "v_proj"]
    assert recipe.train.tau == 1.0 and recipe.output.time_budget_s is not None


def test_gpu_recipe_is_the_default_recipe_at_gpu_scale():
    """Same adapters, prompts, groups, losses and router as the CPU default, so its bundle has the same shape."""
    cpu, gpu = load_recipe(RECIPES / "default.toml"), load_recipe(RECIPES / "gpu.toml")
    assert gpu.model.device == "cuda" and gpu.output.time_budget_s < 600
    assert gpu.train.lora == cpu.train.lora and gpu.train.max_length == cpu.train.max_length
    assert (gpu.curation.num_negatives, gpu.curation.num_random_negatives) == (7, 1)
    assert gpu.train.bce_weight == cpu.train.bce_weight and gpu.router == cpu.router
    assert gpu.output.general_expert and gpu.stage_config("stage1").steps > cpu.stage_config("stage1").steps


def test_stage_overrides_merge_with_train(tmp_path):
    path = tmp_path / "r.toml"
    path.write_text("[train]\nsteps = 10\nlr = 1e-4\n[train.lora]\nr = 8\n"
                    "[stage2]\nsteps = 3\nlora = {dropout = 0.0}\n")
    recipe = load_recipe(path)
    s1, s2 = recipe.stage_config("stage1"), recipe.stage_config("stage2")
    assert (s1.steps, s1.lora.r, s1.lora.dropout) == (10, 8, 0.05)
    assert (s2.steps, s2.lr, s2.lora.r, s2.lora.dropout) == (3, 1e-4, 8, 0.0)


def test_yaml_recipe_and_overrides(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("data:\n  paths: [a, b]\ntrain:\n  steps: 5\noutput:\n  ablations: [single-lora]\n")
    recipe = load_recipe(path)
    assert recipe.data.paths == ["a", "b"] and recipe.train.steps == 5
    changed = recipe.with_overrides(["train.lr=3e-4", "train.lora.r=4", "stage1.steps=2", "model.template=qwen3"])
    assert changed.train.lr == 3e-4 and changed.train.lora.r == 4 and changed.stage_config("stage1").steps == 2
    assert changed.model.template == "qwen3" and recipe.train.lr == 1e-4


@pytest.mark.parametrize(
    "text, message",
    [
        ("[trian]\nsteps = 1\n", "unknown sections \\['trian'\\]"),
        ("[train]\nstpes = 1\n", "\\[train\\] has unknown keys \\['stpes'\\]"),
        ("[train]\nsteps = 0\n", "`steps` must be an int >= 1, got 0"),
        ("[stage1]\nlrr = 1\n", "\\[stage1\\] has unknown keys"),
        ("[output]\nablations = ['x']\n", "ablations"),
        ("[train\n", "invalid TOML"),
    ],
)
def test_bad_recipes_name_the_problem(tmp_path, text, message):
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(ValueError, match=message):
        load_recipe(path)


def test_cli_help_explains_every_option(capsys):
    parser = build_parser()
    with pytest.raises(SystemExit):
        parser.parse_args(["train", "--help"])
    text = capsys.readouterr().out
    for flag in ("--recipe", "--data", "--out", "--resume", "--max-steps", "--time-budget", "--ablations",
                 "--set", "--abstraction-report", "--precision", "--base-model", "--no-stage1", "--seed"):
        assert flag in text


def test_cli_flags_override_the_recipe(capsys, tmp_path):
    assert main(["train", "--recipe", str(RECIPES / "smoke.toml"), "--data", str(tmp_path), "--out", "o",
                 "--seed", "3", "--time-budget", "2", "--set", "train.lr=0.5", "--dry-run"]) == 0
    resolved = json.loads(capsys.readouterr().out)
    assert resolved["data"]["paths"] == [str(tmp_path)] and resolved["output"]["dir"] == "o"
    assert resolved["train"]["seed"] == 3 and resolved["router"]["seed"] == 3
    assert resolved["output"]["time_budget_s"] == 120.0 and resolved["train"]["lr"] == 0.5
    assert Recipe.from_dict(resolved).train.lr == 0.5
