"""`rlhf bench` runs the library's own stages end to end on a very small workload (not a timing test)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest


def test_bench_reports_every_phase_with_its_flops(tmp_path):
    out = tmp_path / "bench.json"
    command = [sys.executable, "-m", "rlhf", "bench", "--batch", "2", "--prompt-tokens", "4", "--new-tokens", "4",
               "--iterations", "1", "--warmup", "0", "--stages", "ppo", "sft", "--json", str(out)]
    result = subprocess.run(command, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "PPO iteration (full)" in result.stdout and "SFT step (full)" in result.stdout
    results = json.loads(out.read_text())
    assert results["peak_gflops"]["fp32"] > 0 and results["peak_gflops"]["bf16"] > 0
    ppo = results["ppo"]["full"]
    assert ppo["iteration_s"]["median"] > 0 and ppo["generated_tokens_per_s"] > 0 and ppo["peak_rss_gb"] > 0
    for phase in ("generate", "score", "reference", "train"):
        assert ppo["phases"][phase]["median"] > 0 and ppo["phases"][phase]["gflop"] > 0, phase
    assert "value" not in ppo["phases"]  # one update an iteration: its forward pass gives the values (rl.folds)
    assert results["sft"]["full"]["tokens_per_s"] > 0 and "reward" not in results


def test_bench_times_given_models_and_prompts_and_says_what_auto_picked(tmp_path):
    from rlhf.bench import build_models

    policy, reward = build_models(tmp_path, "tiny")
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"input_ids": [5, 6, 7]}) + "\n" + json.dumps({"prompt": "w8 w9"}) + "\n")
    out = tmp_path / "bench.json"
    command = [sys.executable, "-m", "rlhf", "bench", "--policy", str(policy), "--reward", str(reward), "--prompts", str(prompts),
               "--batch", "2", "--new-tokens", "3", "--iterations", "1", "--warmup", "0", "--stages", "reward", "dpo",
               "--precision", "auto", "--json", str(out)]
    result = subprocess.run(command, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    results = json.loads(out.read_text())
    assert results["model"]["size"] == str(policy) and results["model"]["layers"] == 4
    assert results["auto"]["picked"] in ("fp32", "bf16") and f"precision auto picked {results['auto']['picked']}" in result.stdout
    assert results["reward"]["full"]["pairs_per_s"] > 0 and results["dpo"]["full"]["pairs_per_s"] > 0
    # 2 pairs of (3 + 3 + EOS) and (2 + 3 + EOS) tokens: the given prompts, not random ones
    assert results["dpo"]["full"]["tokens_per_s"] * results["dpo"]["full"]["step_s"]["median"] == pytest.approx(2 * 7 + 2 * 6)

    # the built models with given prompts: the run names the built size
    result = subprocess.run(command[:4] + command[8:], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert json.loads(out.read_text())["model"]["size"] == "tiny"

    prompts.write_text(json.dumps({"input_ids": [5, 6]}) + "\n" + json.dumps({"input_ids": []}) + "\n")
    result = subprocess.run(command, capture_output=True, text=True)
    assert result.returncode == 2 and f"{prompts}:2: needs input_ids" in result.stderr and "Traceback" not in result.stderr
