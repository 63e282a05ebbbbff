"""`rlhf eval`: win-rates, the report with its plots, untrusted text kept inert."""

from __future__ import annotations

import json

import pytest
import torch

from rlhf import evaluation, ppo, rl
from rlhf.sampling import SamplingConfig
from rlhf.scoring import RewardSourceConfig

from conftest import constant_reward_model


def test_win_rate_counts_ties_half():
    a, b = torch.tensor([1.0, 2.0, 3.0, 0.0]), torch.tensor([0.0, 2.0, 5.0, -1.0])
    assert evaluation.win_rate(a, b) == {"win_rate": 0.625, "wins": 0.5, "ties": 0.25, "losses": 0.25}


def test_report_compares_policies_with_the_oracle(tiny_sft_dir, tiny_prompts, tmp_path):
    run = tmp_path / "ppo"
    config = ppo.PPOConfig(
        policy=str(tiny_sft_dir), output_dir=str(run), prompts=rl.PromptData(train=[str(tiny_prompts)]),
        reward=RewardSourceConfig(kind="function", path="conftest:polite_reward"),
        generation=SamplingConfig(temperature=1.0, max_new_tokens=16),
        algo=ppo.PPOAlgoConfig(batch_size=16, minibatch_size=8, micro_batch_size=8, epochs=2),
        optim=rl.OptimConfig(lr=1e-3, schedule="constant"), stop=rl.StopConfig(max_steps=12), precision="fp32",
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
    # the diversity of each policy's completions as samples.jsonl holds them, counted here
    samples = [json.loads(line) for line in (tmp_path / "eval" / "samples.jsonl").read_text().splitlines()]
    for row in results:
        texts = [" ".join(s[row["policy"]]["completion"].split()) for s in samples]
        assert row["distinct_per_100"] == pytest.approx(100 * len(set(texts)) / len(texts))
        assert row["top_share"] == pytest.approx(max(texts.count(t) for t in texts) / len(texts))
    text = report.read_text()
    assert "win-rate vs ref (gold)" in text and "![training.png](training.png)" in text
    assert "| distinct /100 | top share | distinct-2 |" in text and "## Warnings" in text
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


def test_the_report_warns_of_a_mean_score_above_the_reward_models_band(tiny_model_dir, tiny_prompts, tmp_path):
    rm = constant_reward_model(tiny_model_dir, tmp_path / "rm", 1.0, [-0.5, 0.5])  # every score 1
    report = evaluation.evaluate(evaluation.EvalConfig(
        reference=str(tiny_model_dir), prompts=[str(tiny_prompts)], reward=RewardSourceConfig(kind="model", path=str(rm)),
        generation=SamplingConfig(temperature=1.0, max_new_tokens=8), output_dir=str(tmp_path / "eval"),
    ))
    assert "mean reward-model score 1.00 is above 0.50, the 95th percentile of the held-out completions" in report.read_text()


def samples(name: str, completions: list[str], scores: list[float], gold: list[float]) -> evaluation.PolicySamples:
    n = len(completions)
    return evaluation.PolicySamples(name, completions, torch.tensor(scores), torch.tensor(gold), torch.zeros(n), torch.full((n,), 5.0), torch.ones(n, dtype=torch.bool))


def test_the_report_warns_of_a_collapsed_policy_that_exploits_the_reward_model():
    reference = samples("sft", ["a b", "c d", "e f", "g h"], [0.0, 0.0, 0.0, 0.0], [1.0, 1.0, 1.0, 1.0])
    # one answer to three of four prompts, scored far above the band by the reward model and
    # below the reference by gold: win-rates 100% (RM) and 12.5% (gold, one tie), a 88-point gap
    policy = samples("runs/ppo/model", ["yes yes", "yes yes", "yes yes", "no"], [3.0, 3.0, 3.0, 3.0], [0.0, 0.0, 0.0, 1.0])
    summary = evaluation.summarize([reference, policy], has_reward=True, band=(-1.0, 1.5))
    assert summary[0]["warnings"] == []
    assert summary[1]["distinct_per_100"] == 50.0 and summary[1]["top_share"] == 0.75 and summary[1]["distinct_2"] == pytest.approx(1 / 3)
    report = evaluation.render_report(summary, [], ["p1", "p2", "p3", "p4"], [reference, policy])
    section = report[report.index("## Warnings") : report.index("## Examples")].strip().splitlines()
    assert section == [
        "## Warnings",
        "",
        "- `runs/ppo/model`: 75% of responses are one and the same text: the policy has collapsed onto one answer whatever the prompt",
        "- `runs/ppo/model`: mean reward-model score 3.00 is above 1.50, the 95th percentile of the held-out completions on which "
        "its accuracy was measured: the reward model is scoring outside what it was tested on",
        "- `runs/ppo/model`: the reward model prefers the policy to the reference on 88 points more of the prompts than the gold "
        "scorer does: the policy is exploiting the reward model",
    ]
    assert "| 50 | 75% | 0.33 | 5.0 |" in report  # distinct /100, top share, distinct-2, then length


def test_the_report_says_when_no_policy_shows_a_sign():
    reference = samples("sft", ["a b", "c d", "e f", "g h"], [0.0, 0.0, 0.0, 0.0], [1.0, 1.0, 1.0, 1.0])
    policy = samples("ppo", ["i j", "k l", "m n", "o p"], [1.0, 1.0, 1.0, 1.0], [2.0, 2.0, 2.0, 2.0])
    summary = evaluation.summarize([reference, policy], has_reward=True, band=(-1.0, 1.5))
    report = evaluation.render_report(summary, [], ["p1", "p2", "p3", "p4"], [reference, policy])
    assert "## Warnings\n\nNo collapse or over-optimisation signs.\n" in report


def test_report_escapes_model_output():
    cell = evaluation._cell("<script>alert(1)</script> | `x`\nnext")
    assert "<script>" not in cell and "|" not in cell.replace("&#124;", "") and "`" not in cell
    assert cell == "&lt;script&gt;alert(1)&lt;/script&gt; &#124; &#96;x&#96;<br>next"
