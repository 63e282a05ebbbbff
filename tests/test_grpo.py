"""The critic-free family (GRPO, Dr. GRPO, RLOO, REINFORCE++): estimators wired as their papers
say, each one learning, KL where it is configured, and the config's refusals."""

from __future__ import annotations

import math

import pytest
import torch

from rlhf import grpo, rl
from rlhf.config import ConfigError
from rlhf.rollout import Rollout
from rlhf.sampling import SamplingConfig
from rlhf.scoring import RewardSourceConfig
from rlhf.tracking import read_metrics


def make_config(policy, prompts, out, estimator: str, **algo) -> grpo.GRPOConfig:
    return grpo.GRPOConfig(
        policy=str(policy),
        output_dir=str(out),
        prompts=rl.PromptData(train=[str(prompts)]),
        reward=RewardSourceConfig(kind="function", path="conftest:polite_reward"),
        generation=SamplingConfig(temperature=1.0, max_new_tokens=16),
        algo=grpo.GroupAlgoConfig(**{"estimator": estimator, "batch_size": 8, "group_size": 4, "minibatch_size": 16, "micro_batch_size": 8, "epochs": 2, **algo}),
        optim=rl.OptimConfig(lr=1e-3, schedule="constant"),
        stop=rl.StopConfig(max_steps=15),
        precision="fp32",
        save_every=100,
    )


def hand_batch() -> Rollout:
    """Two prompts x two responses; response lengths 2, 1, 2, 2; KL 0.5 on every response token."""
    mask = torch.tensor([[1, 1], [1, 0], [1, 1], [1, 1]])
    batch = Rollout(torch.zeros(4, 1, dtype=torch.long), torch.ones(4, 1, dtype=torch.long), torch.zeros(4, 2, dtype=torch.long), mask, torch.ones(4, dtype=torch.bool))
    batch.logprobs = torch.full((4, 2), -1.0) * mask
    batch.ref_logprobs = torch.full((4, 2), -1.5) * mask
    batch.kl = (batch.logprobs - batch.ref_logprobs) * mask
    batch.scores = batch.raw_scores = torch.tensor([1.0, 3.0, 2.0, 2.0])
    return batch


def algorithm(estimator: str, placement: str = "auto", group_size: int = 2) -> grpo.GroupAlgorithm:
    config = grpo.GRPOConfig(algo=grpo.GroupAlgoConfig(estimator=estimator, group_size=group_size), kl=grpo.GroupKLConfig(placement=placement))
    return grpo.GroupAlgorithm(config)


def test_grpo_advantages_are_the_group_normalised_scores_on_every_response_token():
    batch = hand_batch()
    algorithm("grpo").advantages(batch, 0.1, None)  # KL in the loss: the scores alone
    a = 1 / (math.sqrt(2) + 1e-4)  # group (1, 3): mean 2, unbiased std sqrt(2); group (2, 2): all 0
    torch.testing.assert_close(batch.advantages, torch.tensor([[-a, -a], [a, 0.0], [0.0, 0.0], [0.0, 0.0]]), atol=1e-6, rtol=0)


def test_rloo_puts_the_kl_in_the_reward_and_takes_the_other_responses_as_the_baseline():
    batch = hand_batch()
    algorithm("rloo").advantages(batch, 0.1, None)
    # rewards: 1 - 0.1 * 1.0 = 0.9, 3 - 0.1 * 0.5 = 2.95, 2 - 0.1, 2 - 0.1; with K = 2 the baseline is the other one
    torch.testing.assert_close(batch.advantages, torch.tensor([[-2.05, -2.05], [2.05, 0.0], [0.0, 0.0], [0.0, 0.0]]), atol=1e-6, rtol=0)
    torch.testing.assert_close(batch.rewards.sum(-1), torch.tensor([0.9, 2.95, 1.9, 1.9]), atol=1e-6, rtol=0)


def test_the_kl_placement_moves_the_penalty_between_reward_and_loss():
    in_reward, in_loss = hand_batch(), hand_batch()
    algorithm("dr_grpo", "reward").advantages(in_reward, 1.0, None)
    algorithm("dr_grpo").advantages(in_loss, 1.0, None)
    # Dr. GRPO, group (1 - 1.0, 3 - 0.5) against (1, 3): the KL of 1.0 against 0.5 widens the gap
    torch.testing.assert_close(in_reward.advantages[:2, 0], torch.tensor([-1.25, 1.25]))
    torch.testing.assert_close(in_loss.advantages[:2, 0], torch.tensor([-1.0, 1.0]))
    logprobs, rows, n = torch.full((2, 2), -1.0, requires_grad=True), torch.tensor([0, 1]), torch.tensor(3.0)
    _, with_kl = algorithm("dr_grpo").loss(logprobs, None, in_loss, rows, n, 1.0)
    _, without = algorithm("dr_grpo", "reward").loss(logprobs, None, in_reward, rows, n, 1.0)
    # k3 with log pi - log pi_ref = 0.5 on 3 tokens over 3: e^-0.5 - 1 + 0.5
    assert with_kl["loss/kl"].item() == pytest.approx(math.exp(-0.5) - 0.5, abs=1e-6) and "loss/kl" not in without


def test_reinforce_pp_whitens_token_returns_over_the_batch():
    batch = hand_batch()
    algorithm("reinforce_pp").advantages(batch, 0.1, None)
    # token rewards: -0.05 on each token, the score added on the last; returns from each token on
    returns = [[0.9, 0.95], [2.95, 0.0], [1.9, 1.95], [1.9, 1.95]]
    values = [r for row, m in zip(returns, batch.mask.tolist()) for r, keep in zip(row, m) if keep]
    mean = sum(values) / len(values)
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))
    expected = [[(r - mean) / std if keep else 0.0 for r, keep in zip(row, m)] for row, m in zip(returns, batch.mask.tolist())]
    torch.testing.assert_close(batch.advantages, torch.tensor(expected), atol=1e-5, rtol=0)
    baseline = hand_batch()
    algorithm("reinforce_pp_baseline").advantages(baseline, 0.1, None)
    # the group's mean score comes off first: (1, 3) -> (-1, 1), (2, 2) -> (0, 0)
    torch.testing.assert_close(baseline.rewards.sum(-1), torch.tensor([-1.1, 0.95, -0.1, -0.1]), atol=1e-6, rtol=0)


@pytest.mark.parametrize("estimator", grpo.ESTIMATORS)
def test_each_estimator_raises_an_easy_reward(tiny_sft_dir, tiny_prompts, tmp_path, estimator):
    # As PPO's learning test: the policy closes politely about half the time, the reward pays for it.
    grpo.train(make_config(tiny_sft_dir, tiny_prompts, tmp_path, estimator))
    metrics = read_metrics(tmp_path)
    scores = [m["score/mean"] for m in metrics]
    first, last = scores[0], sum(scores[-3:]) / 3
    print(f"{estimator}: score {first:.3f} -> {last:.3f}, KL {metrics[-1]['kl/sequence']:.2f}")
    assert first < 0.4 and last > first + 0.5
    assert "value/mean" not in metrics[-1] and not (tmp_path / "value").exists()  # no critic
    assert ("loss/kl" in metrics[-1]) == (estimator in grpo.KL_IN_LOSS)


def test_a_group_of_one_is_refused_where_the_baseline_needs_the_others(tiny_model_dir, tiny_prompts, tmp_path):
    config = make_config(tiny_model_dir, tiny_prompts, tmp_path, "rloo", group_size=1, minibatch_size=4, micro_batch_size=4)
    with pytest.raises(ConfigError, match=r"^grpo.algo.group_size: must be >= 2 for estimator rloo .*got 1$"):
        grpo.check_config(config, 1)
    grpo.check_config(make_config(tiny_model_dir, tiny_prompts, tmp_path, "reinforce_pp", group_size=1, minibatch_size=4, micro_batch_size=4), 1)
    with pytest.raises(ConfigError, match=r"must divide the 32 responses of a step \(grpo.algo.batch_size=8 x group_size=4\), got 6"):
        grpo.check_config(make_config(tiny_model_dir, tiny_prompts, tmp_path, "grpo", minibatch_size=6), 1)


def test_the_responses_to_one_prompt_are_consecutive_rows_of_the_rollout(tiny_model_dir, tiny_prompts, tmp_path, monkeypatch):
    seen = []
    rollout = rl.rollout

    def recording(model, reference, prompts, texts, *args, **kwargs):
        seen.append(texts)
        return rollout(model, reference, prompts, texts, *args, **kwargs)

    monkeypatch.setattr(rl, "rollout", recording)
    config = make_config(tiny_model_dir, tiny_prompts, tmp_path, "grpo")
    config.stop.max_steps = 1
    grpo.train(config)
    texts = seen[0]
    assert len(texts) == 32 and all(len(set(texts[g : g + 4])) == 1 for g in range(0, 32, 4)) and len(set(texts)) > 1


def test_under_bf16_one_update_a_step_takes_the_old_logprobs_from_its_own_forward_pass(tiny_model_dir, tiny_prompts, tmp_path, monkeypatch):
    # No critic: what the update's forward pass gives is the trainer's log-probs (under bf16 the
    # sampler's are the engine's), so the folded run makes one policy pass a step fewer and logs
    # what a run with the rollout's own pass logs.
    runs = {}
    for fold in (True, False):
        config = make_config(tiny_model_dir, tiny_prompts, tmp_path / str(fold), "grpo", minibatch_size=32, micro_batch_size=32, epochs=1)
        config.stop.max_steps, config.precision = 2, "bf16"
        calls = []
        with monkeypatch.context() as patch:
            patch.setattr(rl, "folds", lambda *args, fold=fold: fold)
            forward = rl.forward
            patch.setattr(rl, "forward", lambda *args: calls.append(1) or forward(*args))
            patch.setattr(rl, "policy_forward", lambda *args, policy_forward=rl.policy_forward: calls.append(1) or policy_forward(*args))
            grpo.train(config)
        runs[fold] = read_metrics(tmp_path / str(fold)), len(calls)
    (folded, folded_calls), (passes, passes_calls) = runs[True], runs[False]
    assert (folded_calls, passes_calls) == (2, 4)  # one training pass a step, against a log-prob pass and a training pass
    for x, y in zip(passes, folded):
        for key in ("score/mean", "kl/sequence", "loss/policy", "policy/entropy", "rollout/mismatch_kl"):
            assert y[key] == pytest.approx(x[key], rel=1e-3, abs=1e-5), (x["step"], key)
