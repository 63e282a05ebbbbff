"""Recipes: YAML plus dotted overrides; unknown keys and wrong types are errors; help from docstrings."""

from __future__ import annotations

import subprocess
import sys

import pytest

from rlhf.config import ConfigError, describe, load_recipe
from rlhf.pipeline import Recipe
from rlhf.sft import SFTConfig


def test_yaml_and_overrides(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("sft:\n  model: base\n  optim:\n    lr: 1e-4\n    epochs: 2\n")
    recipe = load_recipe(Recipe, path, ["sft.optim.lr=3e-5", "sft.lora.enabled=true", "sft.data.train=[a.jsonl, b.jsonl]"])
    assert recipe.sft.model == "base"
    assert recipe.sft.optim.lr == 3e-5 and recipe.sft.optim.epochs == 2
    assert recipe.sft.lora.enabled is True
    assert recipe.sft.data.train == ["a.jsonl", "b.jsonl"]
    assert recipe.reward.optim.lr == 5e-5  # untouched sections keep their defaults


@pytest.mark.parametrize(
    "override,message",
    [
        ("sft.optim.lrr=1", "unknown key 'sft.optim.lrr'"),
        ("sfft.model=x", "unknown key 'sfft'"),
        ("sft.optim.epochs=two", "sft.optim.epochs: expected an integer, got 'two'"),
        ("sft.lora.enabled=maybe", "sft.lora.enabled: expected true or false"),
        ("sft.precision=fp8", "sft.precision: 'fp8' is not one of"),
        ("sft.optim=3", "sft.optim: expected a mapping"),
        ("sft.model", "must look like section.key=value"),
    ],
)
def test_bad_keys_and_values_are_errors(override, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        load_recipe(Recipe, None, [override])


def test_unknown_key_in_the_file_names_the_file(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("sft:\n  modle: base\n")
    with pytest.raises(ConfigError, match=rf"^{path}: unknown key 'sft.modle'"):
        load_recipe(Recipe, path)


def test_help_comes_from_field_docstrings():
    rows = {key: (default, doc) for key, default, doc in describe(SFTConfig, "sft.")}
    assert rows["sft.optim.lr"][1] == "Peak learning rate (AdamW)."
    assert rows["sft.lora.r"] == ("16", "Adapter rank.")
    assert all(doc for _, doc in rows.values()), [k for k, (_, d) in rows.items() if not d]


def test_cli_reports_errors_without_a_traceback(tmp_path):
    bad = tmp_path / "prefs.jsonl"
    bad.write_text('{"prompt": "a", "chosen": "b"}\n')
    result = subprocess.run(
        [sys.executable, "-m", "rlhf", "reward", "reward.model=unused", f"reward.data.train={bad}"],
        capture_output=True, text=True,
    )
    assert result.returncode == 2
    assert f"error: {bad}:1: field 'rejected': missing" in result.stderr
    assert "Traceback" not in result.stderr
