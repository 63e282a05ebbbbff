"""`rlhf eval`: win-rates, the report with its plots, untrusted text kept inert."""

from __future__ import annotations

import json

import pytest
import torch

from rlhf import evaluation, ppo
from rlhf.sampling import SamplingConfig
from rlhf.scoring import RewardSourceConfig


def test_win_rate_counts_ties_half():
    a, b = torch.tensor([1.0, 2.0, 3.0, 0.0]), torch.tensor([0.0, 2.0, 5.0, -1.0])
    assert evaluation.win_rate(a, b) == {"win_rate": 0.625, "wins": 0.5, "ties": 0.25, "losses": 0.25}


def test_report_compares_policies_with_the_oracle(tiny_sft_dir, tiny_prompts, tmp_path):
    run = tmp_path / "ppo"
    config = ppo.PPOConfig(
        policy=str(tiny_sft_dir), output_dir=str(run), prompts=ppo.PromptData(train=[str(tiny_prompts)]),
        reward=RewardSourceConfig(kind="function", path="conftest:polite_reward"),
        generation=SamplingConfig(temperature=1.0, max_new_tokens=16),
        algo=ppo.PPOAlgoConfig(batch_size=16, minibatch_size=8, micro_batch_size=8, epochs=2),
        optim=ppo.PPOOptimConfig(lr=1e-3, schedule="constant"), stop=ppo.StopConfig(max_steps=12), precision="fp32",
    )
    policy = ppo.train(config)
    report = evaluation.evaluate(evaluation.EvalConfig(
        reference=str(tiny_sft_dir), policies=[str(policy)], prompts=[str(tiny_prompts)],
        reward=RewardSourceConfig(kind="function", path="conftest:polite_reward"), oracle="conftest:polite_reward",
        generation=SamplingConfig(temperature=0.7, max_new_tokens=16), runs=[str(run)], output_dir=str(tmp_path / "eval"),
    ))
    results = json.loads((tmp_path / "eval" / "results.json").read_text())
    reference, trained = results
    assert reference["win_rate_gold"] == 0.5 and reference["kl"] == pytest.approx(0.0, abs=1e-4)
    assert trained["gold"] > reference["gold"] and trained["win_rate_gold"] > 0.6
    assert trained["kl"] > 0 and 0 <= trained["eos_fraction"] <= 1 and trained["length"] > 0
    text = report.read_text()
    assert "win-rate vs ref (gold)" in text and "![training.png](training.png)" in text
    for png in ("training.png", "scores.png"):
        assert (tmp_path / "eval" / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_eos_fraction_counts_the_end_of_turn(turn_end_model_dir, turn_end_prompts, tmp_path):
    # The policy answers <|im_end|> (after "hello" to the last prompt), then " world"; its
    # tokenizer's EOS is <|endoftext|>.
    evaluation.evaluate(evaluation.EvalConfig(
        reference=str(turn_end_model_dir), prompts=[str(turn_end_prompts)], generation=SamplingConfig(temperature=1.0, max_new_tokens=8),
        output_dir=str(tmp_path),
    ))
    (row,) = json.loads((tmp_path / "results.json").read_text())
    assert row["eos_fraction"] == 1.0 and row["length"] == 1.25 and row["prompts"] == 4  # lengths 1, 1, 1, 2
    samples = [json.loads(line) for line in (tmp_path / "samples.jsonl").read_text().splitlines()]
    assert [s[str(turn_end_model_dir)]["completion"] for s in samples] == ["", "", "", "hello"]


def test_report_escapes_model_output():
    cell = evaluation._cell("<script>alert(1)</script> | `x`\nnext")
    assert "<script>" not in cell and "|" not in cell.replace("&#124;", "") and "`" not in cell
    assert cell == "&lt;script&gt;alert(1)&lt;/script&gt; &#124; &#96;x&#96;<br>next"
