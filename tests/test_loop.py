"""`rlhf loop`: rounds of sampling, labels, reward model and PPO on the tiny model; the kill test;
the choice of what to label."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from rlhf import selection

HERE = Path(__file__).parent


def polite_ranking(prompt, completions, rng):
    """A labeler function for the tests: polite closes first, rude ones last, ties in random order."""
    keyed = sorted(completions, key=lambda c: (-(("Happy to help" in c) - ("Whatever" in c)), rng.random()))
    return keyed, rng.choice(["ann", "bob"])


def slow_ranking(prompt, completions, rng):
    """The same, a fifth of a second per item, so that a test can kill the loop mid-feedback."""
    time.sleep(0.2)
    return polite_ranking(prompt, completions, rng)


def loop_recipe(tmp_path: Path, sft_dir, prompts, data, labeler: str = "test_loop:polite_ranking", extra: str = "") -> Path:
    runs = tmp_path / "runs"
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"""
reward:
  model: {sft_dir}
  data: {{train: [{data['prefs']}], eval: [{data['prefs']}]}}
  optim: {{lr: 2e-3, batch_size: 8, micro_batch_size: 8, epochs: 20}}
  save_every: 1
  precision: fp32
ppo:
  policy: {sft_dir}
  prompts: {{train: [{prompts}]}}
  reward: {{kind: model, path: unused}}
  generation: {{temperature: 1.0, max_new_tokens: 8}}
  algo: {{batch_size: 8, minibatch_size: 8, micro_batch_size: 8, epochs: 1}}
  save_every: 1
  precision: fp32
eval:
  reference: {sft_dir}
  prompts: [{prompts}]
  num_prompts: 8
  oracle: conftest:polite_reward
  generation: {{max_new_tokens: 8}}
loop:
  project_dir: {runs}
  prompts: [{prompts}]
  labels_per_round: [12, 8]
  candidates: 3
  ppo_steps: 8
  feedback: {{labeler: '{labeler}'}}
{extra}
""")
    return recipe


def run_loop(recipe: Path, *overrides: str, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "rlhf", "loop", str(recipe), *overrides], capture_output=True, text=True, cwd=HERE, timeout=timeout)


def labels(project: Path) -> list[dict]:
    return [json.loads(line) for r in sorted(project.glob("round-*")) for line in (r / "feedback.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def finished_loop(tiny_model_dir, tiny_prompts, tiny_data, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("loop")
    recipe = loop_recipe(tmp, tiny_model_dir, tiny_prompts, tiny_data)
    result = run_loop(recipe)
    assert result.returncode == 0, result.stderr[-3000:]
    return tmp / "runs", recipe, result


def test_each_round_labels_its_own_samples_then_trains_the_reward_model_and_ppo(finished_loop, tiny_model_dir):
    project, _, result = finished_loop
    assert f"loop report: {project}/report.md" in result.stdout
    first, second = project / "round-000", project / "round-001"
    for rnd in (first, second):
        for path in ("pool.jsonl", "selected.jsonl", "feedback.jsonl", "reward/model/config.json", "ppo/model/config.json", "eval/report.md", "summary.json"):
            assert (rnd / path).exists(), rnd / path
        assert not (rnd / "feedback.partial.jsonl").exists()
    # Round 0 samples the SFT policy, round 1 the policy round 0's PPO made; the reference stays SFT.
    pool_models = {c["model"] for line in (second / "pool.jsonl").read_text().splitlines() for c in json.loads(line)["candidates"]}
    assert pool_models == {str(first / "ppo" / "model")}
    ppo_config = (second / "ppo" / "config.yaml").read_text()
    assert f"policy: {first / 'ppo' / 'model'}" in ppo_config and f"reference: {tiny_model_dir}" in ppo_config
    assert f"path: {first / 'reward' / 'model'}" in (first / "ppo" / "config.yaml").read_text()
    # Round 1's reward model learns from both rounds' labels.
    summary = json.loads((second / "summary.json").read_text())
    assert (summary["labels"], summary["labels_total"]) == (8, 20)
    assert 0.0 <= summary["fresh_accuracy"] <= 1.0  # round 0's reward model on round 1's labels
    assert json.loads((first / "summary.json").read_text())["fresh_accuracy"] is None
    # Every label is a ranking of candidates the round's policy wrote for that prompt.
    pool: dict[str, set] = {}  # a prompt may be drawn more than once
    for row in map(json.loads, (second / "pool.jsonl").read_text().splitlines()):
        pool.setdefault(row["prompt"], set()).update(c["completion"] for c in row["candidates"])
    for label in (json.loads(line) for line in (second / "feedback.jsonl").read_text().splitlines()):
        assert set(label["completions"]) <= pool[label["prompt"]] and len(label["completions"]) >= 2
        assert label["labeler"] in ("ann", "bob")
    report = (project / "report.md").read_text()
    assert "| 0 | 12 (12) |" in report and "| 1 | 8 (20) |" in report
    assert (project / "loop.png").stat().st_size > 1000
    eval_rows = json.loads((second / "eval" / "results.json").read_text())
    assert [row["policy"] for row in eval_rows] == [str(tiny_model_dir), str(first / "ppo" / "model"), str(second / "ppo" / "model")]


def test_a_finished_loop_run_again_does_nothing_and_status_says_where_it_is(finished_loop):
    project, recipe, _ = finished_loop
    before = {p: p.stat().st_mtime_ns for p in project.rglob("*") if p.is_file() and p.name not in ("report.md", "loop.png", "loop.json")}
    again = run_loop(recipe)
    assert again.returncode == 0, again.stderr[-3000:]
    assert {p: p.stat().st_mtime_ns for p in before} == before
    status = subprocess.run([sys.executable, "-m", "rlhf", "loop", "status", str(project)], capture_output=True, text=True, cwd=HERE)
    assert status.returncode == 0
    assert "round-001: sampled, selected, labelled, reward model, ppo, evaluated" in status.stdout


def _wait_for(condition, process: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while not condition():
        assert process.poll() is None, process.communicate()[1][-3000:]
        assert time.time() < deadline, "the loop never reached the point to kill it at"
        time.sleep(0.05)


def test_killed_in_feedback_reward_model_and_ppo_the_loop_finishes_with_the_same_labels(finished_loop, tiny_model_dir, tiny_prompts, tiny_data, tmp_path):
    uninterrupted, _, _ = finished_loop
    recipe = loop_recipe(tmp_path, tiny_model_dir, tiny_prompts, tiny_data, labeler="test_loop:slow_ranking")
    project = tmp_path / "runs"
    second = project / "round-001"

    def lines(path: Path) -> int:
        return path.read_bytes().count(b"\n") if path.exists() else 0

    kill_points = [  # (step, when to kill, what must not be there yet)
        ("feedback", lambda: lines(project / "round-000" / "feedback.partial.jsonl") >= 4, project / "round-000" / "feedback.jsonl"),
        ("reward model", lambda: any((second / "reward" / "checkpoints").glob("step-*")), second / "reward" / "model"),
        ("ppo", lambda: any((second / "ppo" / "checkpoints").glob("step-*")), second / "ppo" / "model"),
    ]
    for name, condition, unfinished in kill_points:
        process = subprocess.Popen([sys.executable, "-m", "rlhf", "loop", str(recipe)], cwd=HERE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        _wait_for(condition, process)
        os.kill(process.pid, signal.SIGKILL)
        process.wait()
        assert process.returncode == -signal.SIGKILL, name
        assert not unfinished.exists(), f"the kill came after the {name} step had finished"
    result = run_loop(recipe)
    assert result.returncode == 0, result.stderr[-3000:]
    got, want = labels(project), labels(uninterrupted)
    items = [(rnd, label["item"]) for rnd in sorted(project.glob("round-*")) for label in map(json.loads, (rnd / "feedback.jsonl").read_text().splitlines())]
    assert len(items) == len(set(items)) == 20  # no label lost or counted twice
    assert got == want  # and the same labels as the run nobody killed
    assert json.loads((second / "summary.json").read_text())["labels_total"] == 20


def test_active_choice_labels_the_items_the_ensemble_is_least_sure_of(finished_loop, tiny_model_dir, tiny_prompts, tiny_data, tmp_path):
    first_reward = finished_loop[0] / "round-000" / "reward" / "model"
    recipe = loop_recipe(tmp_path, tiny_model_dir, tiny_prompts, tiny_data)
    result = run_loop(
        recipe, "loop.selection.strategy=active", "loop.selection.pool=3", f"loop.reward={first_reward}", "loop.labels_per_round=[6]",
        f"loop.initial_feedback=[{tiny_data['prefs']}]",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    rnd = tmp_path / "runs" / "round-000"
    pool = [json.loads(line) for line in (rnd / "pool.jsonl").read_text().splitlines()]
    selected = [json.loads(line) for line in (rnd / "selected.jsonl").read_text().splitlines()]
    assert len(pool) == 18 and len(selected) == 6
    chosen = [item["uncertainty"] for item in selected]
    assert chosen == sorted(chosen, reverse=True)
    # Fresh accuracy is measured with the reward model the choice used, before training on the labels.
    assert json.loads((rnd / "summary.json").read_text())["fresh_accuracy"] is not None


def test_a_recipe_without_a_labeler_or_with_a_bad_one_is_refused_before_any_work(tiny_model_dir, tiny_prompts, tiny_data, tmp_path):
    recipe = loop_recipe(tmp_path, tiny_model_dir, tiny_prompts, tiny_data, labeler="no_such_module:rank")
    result = run_loop(recipe)
    assert result.returncode == 2
    assert "loop.feedback.labeler: cannot import 'no_such_module'" in result.stderr
    result = run_loop(recipe, "loop.feedback.labeler=", "loop.labels_per_round=[4, 0]")
    assert result.returncode == 2 and "loop.labels_per_round" in result.stderr
    result = run_loop(recipe, "loop.feedback.labeler=")
    assert result.returncode == 2 and "loop.feedback: set labeler" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "runs").exists()


# ---------------------------------------------------------------- the math of active choice


def test_item_pairs_lists_every_pair_within_each_item():
    assert selection.item_pairs([3, 2]) == ([0, 0, 1, 3], [1, 2, 2, 4], [0, 0, 0, 1])


def test_pair_disagreement_is_the_spread_of_the_heads_probabilities():
    heads = torch.tensor([[1.0, 0.0], [-1.0, 0.0]])  # two heads that disagree on the first feature
    first, second = torch.tensor([[2.0, 5.0], [0.0, 3.0]]), torch.tensor([[0.0, 1.0], [0.0, 0.0]])
    spread = selection.pair_disagreement(heads, first, second)
    p, q = 1 / (1 + torch.exp(torch.tensor(-2.0))), 1 / (1 + torch.exp(torch.tensor(2.0)))
    expected_first = torch.tensor([p, q]).std()  # heads say 0.88 and 0.12
    assert torch.allclose(spread, torch.stack([expected_first, torch.tensor(0.0)]), atol=1e-6)  # the second pair differs only where both heads are 0


def test_bootstrap_heads_agree_where_the_labels_do_and_start_from_the_trained_head():
    generator = torch.Generator().manual_seed(0)
    better = torch.randn(200, 4, generator=generator) + torch.tensor([1.0, 0, 0, 0])
    worse = torch.randn(200, 4, generator=generator) - torch.tensor([1.0, 0, 0, 0])
    heads = selection.bootstrap_heads(better, worse, torch.zeros(4), members=4, seed=0)
    assert heads.shape == (4, 4)
    assert (heads[:, 0] > 0.5).all()  # every head learns that feature 0 decides
    assert heads[:, 0].std() > 0  # resamples differ
    # With no pairs to say otherwise the heads stay at the trained head.
    still = selection.bootstrap_heads(torch.zeros(10, 4), torch.zeros(10, 4), torch.tensor([0.3, -0.2, 0.1, 0.0]), members=2, seed=0)
    assert torch.allclose(still, torch.tensor([0.3, -0.2, 0.1, 0.0]).expand(2, 4), atol=1e-5)


def test_most_uncertain_takes_the_largest_first():
    assert selection.most_uncertain(torch.tensor([0.1, 0.5, 0.3, 0.5]), 3) == [1, 3, 2]


def test_a_label_torn_by_a_kill_mid_write_is_cut_off_and_asked_again(tmp_path):
    from rlhf.loop import _read_partial

    partial = tmp_path / "feedback.partial.jsonl"
    whole = '{"item": 0, "completions": ["a", "b"]}\n{"item": 2, "completions": ["c", "d"]}\n'
    partial.write_text(whole + '{"item": 5, "compl')
    assert sorted(_read_partial(partial)) == [0, 2]
    assert partial.read_text() == whole  # the next label is appended after a whole line
    assert _read_partial(tmp_path / "missing.jsonl") == {}


def test_the_loop_keeps_a_lora_adapter_per_labeler_against_their_own_score(tiny_model_dir, tiny_prompts, tiny_data, tmp_path):
    recipe = loop_recipe(tmp_path, tiny_model_dir, tiny_prompts, tiny_data)
    result = run_loop(recipe, "loop.adapters=[ann]", "loop.labels_per_round=[12]", "loop.ppo_steps=2")
    assert result.returncode == 0, result.stderr[-3000:]
    rnd = tmp_path / "runs" / "round-000"
    labelers = json.loads((rnd / "reward" / "model" / "config.json").read_text())["reward_labelers"]
    counts = {name: sum(label["labeler"] == name for label in labels(tmp_path / "runs")) for name in ("ann", "bob")}
    assert {name: entry["labels"] for name, entry in labelers.items()} == {name: n for name, n in counts.items() if n}
    config = yaml.safe_load((rnd / "adapters" / "ann" / "config.yaml").read_text())
    assert config["lora"]["enabled"] and config["reward"]["labeler"] == "ann" and config["policy"] == str(tiny_model_dir)
    adapter = rnd / "adapters" / "ann" / "model" / "adapter"
    assert json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"] == str(tiny_model_dir)
    assert json.loads((rnd / "summary.json").read_text())["adapters"] == {"ann": str(adapter)}
    assert not (rnd / "adapters" / "bob").exists()
    result = run_loop(recipe, "loop.adapters=[ann]", "loop.reward_update=warm")
    assert result.returncode == 2 and "loop.adapters: a personal reward model is retrained each round" in result.stderr
