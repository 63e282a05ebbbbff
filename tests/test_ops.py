"""The tensor math against hand-computed values and slow reference loops written here."""

from __future__ import annotations

import math

import pytest
import torch

from rlhf import ops


def assert_close(actual: torch.Tensor, expected, atol: float = 1e-6) -> None:
    torch.testing.assert_close(actual, torch.tensor(expected, dtype=actual.dtype), atol=atol, rtol=0)


def test_pairwise_loss_hand_computed():
    better, worse = torch.tensor([2.0, 0.0]), torch.tensor([1.0, 0.0])
    # -log sigmoid(1) = log(1 + e^-1) = 0.31326169, -log sigmoid(0) = log 2 = 0.69314718
    assert ops.pairwise_loss(better, worse).item() == pytest.approx((0.31326169 + 0.69314718) / 2, abs=1e-6)
    # a margin of 0.5 on the first pair: log(1 + e^-0.5) = 0.47407698
    margin = torch.tensor([0.5, 0.0])
    assert ops.pairwise_loss(better, worse, margin).item() == pytest.approx((0.47407698 + 0.69314718) / 2, abs=1e-6)
    weight = torch.tensor([0.25, 0.75])
    assert ops.pairwise_loss(better, worse, weight=weight).item() == pytest.approx(0.59817581, abs=1e-6)


def test_pairwise_loss_gradient_pushes_better_up():
    better = torch.tensor([0.0], requires_grad=True)
    worse = torch.tensor([0.0], requires_grad=True)
    ops.pairwise_loss(better, worse).backward()
    assert better.grad.item() == pytest.approx(-0.5) and worse.grad.item() == pytest.approx(0.5)


def test_ranking_expands_to_all_pairs_best_first():
    better, worse, group = ops.ranking_pairs([3, 2, 4])
    # ranking 0 holds flat items 0,1,2; ranking 1 items 3,4; ranking 2 items 5..8
    assert better.tolist() == [0, 0, 1, 3, 5, 5, 5, 6, 6, 7]
    assert worse.tolist() == [1, 2, 2, 4, 6, 7, 8, 7, 8, 8]
    assert group.tolist() == [0, 0, 0, 1, 2, 2, 2, 2, 2, 2]
    assert len(better) == 3 * 2 // 2 + 1 + 4 * 3 // 2


def test_comparison_loss_weights_each_ranking_once():
    from rlhf.reward import Example, comparison_loss

    examples = [Example([[1], [2], [3]]), Example([[4], [5]])]
    scores = torch.tensor([3.0, 1.0, 0.0, 0.0, 2.0])
    # ranking: diffs 2, 3, 1 -> log(1+e^-2)=0.12692801, log(1+e^-3)=0.04858735, log(1+e^-1)=0.31326169
    ranking = (0.12692801 + 0.04858735 + 0.31326169) / 3
    pair = 2.12692801  # diff -2 -> log(1 + e^2)
    assert comparison_loss(scores, examples, n_global=2).item() == pytest.approx((ranking + pair) / 2, abs=1e-6)


# ---------------------------------------------------------------- PPO math


def test_kl_shaped_rewards_hand_computed():
    logprobs = torch.tensor([[-1.0, -2.0, -3.0, -4.0]])
    ref_logprobs = torch.tensor([[-1.5, -2.0, -2.0, -9.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    rewards, kl = ops.kl_shaped_rewards(torch.tensor([2.0]), logprobs, ref_logprobs, mask, beta=0.1)
    assert_close(kl, [[0.5, 0.0, -1.0, 0.0]])
    # -beta * kl on every token, plus the score on the last real token (index 2), nothing after
    assert_close(rewards, [[-0.05, 0.0, 0.1 + 2.0, 0.0]])
    _, kl3 = ops.kl_shaped_rewards(torch.tensor([2.0]), logprobs, ref_logprobs, mask, beta=0.1, estimator="k3")
    # k3 = (r - 1) - log r, r = exp(ref - logp): exp(-0.5) -> 0.10653066, exp(1) -> 0.71828183
    assert_close(kl3, [[0.10653066, 0.0, 0.71828183, 0.0]], atol=1e-6)


def test_gae_hand_computed():
    rewards = torch.tensor([[0.0, 0.0, 1.0]])
    values = torch.tensor([[0.5, 0.2, 0.4]])
    mask = torch.ones(1, 3)
    advantages, returns = ops.gae(rewards, values, mask, gamma=1.0, lam=0.9)
    # t2: 1 - 0.4 = 0.6; t1: 0.4 - 0.2 + 0.9 * 0.6 = 0.74; t0: 0.2 - 0.5 + 0.9 * 0.74 = 0.366
    assert_close(advantages, [[0.366, 0.74, 0.6]])
    assert_close(returns, [[0.866, 0.94, 1.0]])
    advantages, _ = ops.gae(rewards, values, mask, gamma=0.5, lam=1.0)
    # t2: 0.6; t1: 0.5 * 0.4 - 0.2 + 0.5 * 0.6 = 0.3; t0: 0.5 * 0.2 - 0.5 + 0.5 * 0.3 = -0.25
    assert_close(advantages, [[-0.25, 0.3, 0.6]])


def test_gae_treats_the_state_after_eos_as_terminal():
    # the response ends at index 1 (EOS); whatever the value network says after it must not leak in
    rewards = torch.tensor([[0.0, 1.0, 0.0, 0.0]])
    values = torch.tensor([[0.3, 0.6, 5.0, -7.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0, 0.0]])
    advantages, returns = ops.gae(rewards, values, mask, gamma=1.0, lam=1.0)
    assert_close(advantages, [[1.0 - 0.3, 1.0 - 0.6, 0.0, 0.0]])
    assert_close(returns, [[1.0, 1.0, 0.0, 0.0]])


def slow_shaped_rewards_and_gae(scores, logprobs, ref_logprobs, values, lengths, beta, gamma, lam):
    """One sequence at a time, one token at a time, straight from the definitions."""
    B, T = logprobs.shape
    rewards = torch.zeros(B, T)
    advantages = torch.zeros(B, T)
    for b in range(B):
        n = lengths[b]
        for t in range(n):
            rewards[b, t] = -beta * (logprobs[b, t] - ref_logprobs[b, t])
        rewards[b, n - 1] += scores[b]
        for t in range(n):
            total = 0.0
            for k in range(t, n):
                next_value = values[b, k + 1] if k + 1 < n else 0.0
                delta = rewards[b, k] + gamma * next_value - values[b, k]
                total += (gamma * lam) ** (k - t) * delta
            advantages[b, t] = total
    return rewards, advantages


def test_rewards_and_gae_match_a_slow_loop_on_random_batches():
    torch.manual_seed(0)
    B, T = 6, 9
    lengths = [9, 1, 4, 7, 2, 9]
    mask = torch.tensor([[1.0] * n + [0.0] * (T - n) for n in lengths])
    logprobs, ref_logprobs, values = torch.randn(B, T), torch.randn(B, T), torch.randn(B, T)
    scores = torch.randn(B)
    rewards, _ = ops.kl_shaped_rewards(scores, logprobs, ref_logprobs, mask, beta=0.2)
    advantages, returns = ops.gae(rewards, values, mask, gamma=0.9, lam=0.8)
    slow_rewards, slow_advantages = slow_shaped_rewards_and_gae(scores, logprobs, ref_logprobs, values, lengths, 0.2, 0.9, 0.8)
    assert torch.allclose(rewards, slow_rewards, atol=1e-6)
    assert torch.allclose(advantages, slow_advantages, atol=1e-5)
    assert torch.allclose(returns, (slow_advantages + values) * mask, atol=1e-5)


def test_whitening_hand_computed():
    x = torch.tensor([1.0, 2.0, 3.0, 4.0])
    mask = torch.ones(4)
    # mean 2.5, unbiased variance 5/3, std 1.2909944
    assert ops.masked_whiten(x, mask).tolist() == pytest.approx([-1.161895, -0.387298, 0.387298, 1.161895], abs=1e-5)
    # without centering the mean stays 2.5 (rewards must keep their mean)
    assert ops.masked_whiten(x, mask, center=False).tolist() == pytest.approx([1.338105, 2.112702, 2.887298, 3.661895], abs=1e-5)
    # masked positions take no part: over [1, 2, 3] the mean is 2 and the variance 1
    x = torch.tensor([1.0, 2.0, 3.0, 100.0])
    assert ops.masked_whiten(x, torch.tensor([1.0, 1.0, 1.0, 0.0]))[:3].tolist() == pytest.approx([-1.0, 0.0, 1.0], abs=1e-5)


def test_policy_loss_hand_computed():
    logprobs = torch.log(torch.tensor([[1.0, 1.5, 0.5]]))
    old = torch.zeros(1, 3)
    advantages = torch.tensor([[1.0, 1.0, -1.0]])
    loss, stats = ops.policy_loss(logprobs, old, advantages, torch.ones(1, 3), clip=0.2)
    # ratios 1, 1.5, 0.5: terms max(-A r, -A clip(r)) = -1, -1.2 (clipped), 0.8 (clipped)
    assert loss.item() == pytest.approx((-1.0 - 1.2 + 0.8) / 3)
    assert stats["clipfrac"].item() == pytest.approx(2 / 3)
    # k3: (r - 1) - log r = 0, 0.0945349, 0.1931472
    assert stats["approx_kl"].item() == pytest.approx((0.0945349 + 0.1931472) / 3, abs=1e-6)


def test_policy_loss_of_shards_adds_up_to_the_whole():
    torch.manual_seed(1)
    logprobs, old, advantages = torch.randn(4, 5), torch.randn(4, 5), torch.randn(4, 5)
    mask = (torch.rand(4, 5) > 0.3).float()
    whole, _ = ops.policy_loss(logprobs, old, advantages, mask)
    n = mask.sum()
    halves = [ops.policy_loss(logprobs[s], old[s], advantages[s], mask[s], num_tokens=n)[0] for s in (slice(0, 2), slice(2, 4))]
    assert (halves[0] + halves[1]).item() == pytest.approx(whole.item(), abs=1e-6)


def test_value_loss_hand_computed():
    values, old, returns = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.5, 0.0]]), torch.tensor([[2.0, 1.0]])
    loss, stats = ops.value_loss(values, old, returns, torch.ones(1, 2), clip=0.2)
    # t0: V_clip = 0.7, max((1-2)^2, (0.7-2)^2) = 1.69; t1: 1; 0.5 * mean = 0.6725
    assert loss.item() == pytest.approx(0.6725)
    assert stats["value_clipfrac"].item() == pytest.approx(0.5)


def test_entropy_and_logprobs_hand_computed():
    logits = torch.log(torch.tensor([[[0.5, 0.25, 0.25]]]))
    logprob, entropy = ops.logprobs_and_entropy(logits, torch.tensor([[1]]))
    # H = 0.5 ln 2 + 2 * 0.25 ln 4 = 1.0397208
    assert entropy.item() == pytest.approx(1.0397208, abs=1e-6) and logprob.item() == pytest.approx(math.log(0.25))
    assert ops.logprobs_and_entropy(torch.zeros(1, 1, 4), torch.tensor([[0]]))[1].item() == pytest.approx(math.log(4))
    # temperature 2 halves the logits [2, 0] -> [1, 0]: log(e / (e + 1)) = -0.3132617; H = ln(e + 1) - e / (e + 1)
    for lp in (ops.logprobs_from_logits(torch.tensor([[[2.0, 0.0]]]), torch.tensor([[0]]), temperature=2.0),
               ops.logprobs_and_entropy(torch.tensor([[[2.0, 0.0]]]), torch.tensor([[0]]), temperature=2.0)[0]):
        assert lp.item() == pytest.approx(-0.3132617, abs=1e-6)
    assert ops.logprobs_and_entropy(torch.tensor([[[2.0, 0.0]]]), torch.tensor([[0]]), 2.0)[1].item() == pytest.approx(math.log(math.e + 1) - math.e / (math.e + 1))


def test_the_entropy_carries_a_gradient_only_when_asked():
    logits = torch.randn(2, 3, 5, requires_grad=True)
    tokens = torch.randint(0, 5, (2, 3))
    for entropy_grad in (True, False):
        logprobs, entropy = ops.logprobs_and_entropy(logits, tokens, 0.7, entropy_grad)
        (grad,) = torch.autograd.grad(entropy.sum(), logits, allow_unused=True) if entropy_grad else (None,)
        assert entropy.requires_grad is entropy_grad and logprobs.requires_grad
        if entropy_grad:
            assert grad.abs().sum() > 0


def test_adaptive_kl_controller_hand_computed():
    controller = ops.AdaptiveKLController(beta=0.1, target=6.0, horizon=10000)
    controller.update(kl=9.0, n_steps=1000)  # error 0.5 clipped to 0.2: beta * (1 + 0.2 * 0.1)
    assert controller.beta == pytest.approx(0.102)
    controller.update(kl=5.4, n_steps=1000)  # error -0.1: beta * (1 - 0.01)
    assert controller.beta == pytest.approx(0.10098)
    fixed = ops.FixedKLController(0.3)
    fixed.update(kl=100.0, n_steps=1000)
    assert fixed.beta == 0.3


def test_explained_variance_hand_computed():
    returns = torch.tensor([[1.0, 2.0, 3.0]])
    assert ops.explained_variance(returns, returns, torch.ones(1, 3)).item() == pytest.approx(1.0)
    # values = mean: residual variance = variance of returns -> 0
    assert ops.explained_variance(torch.full((1, 3), 2.0), returns, torch.ones(1, 3)).item() == pytest.approx(0.0, abs=1e-6)


def test_eos_mask_off_by_one():
    from rlhf.sampling import response_mask, truncate_at_eos

    eos, pad = 0, 9
    responses = torch.tensor([[5, 0, 7, 0], [5, 6, 7, 8], [0, 3, 3, 3]])
    truncated, ended = truncate_at_eos(responses, [eos], pad)
    assert truncated.tolist() == [[5, 0, 9, 9], [5, 6, 7, 8], [0, 9, 9, 9]]
    assert ended.tolist() == [True, False, True]
    mask = response_mask(truncated, [eos])
    # the EOS itself is in (its log-prob is trained and the score sits on it), the token after is out
    assert mask.tolist() == [[1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0]]
    rewards, _ = ops.kl_shaped_rewards(torch.tensor([1.0, 2.0, 3.0]), torch.zeros(3, 4), torch.zeros(3, 4), mask.float(), beta=0.1)
    assert rewards.tolist() == [[0.0, 1.0, 0.0, 0.0], [0.0, 0.0, 0.0, 2.0], [3.0, 0.0, 0.0, 0.0]]


# ---------------------------------------------------------------- critic-free estimators


def test_group_advantages_hand_computed():
    # group 1: mean 3, unbiased std sqrt((4 + 1 + 0 + 9) / 3) = 2.1602469; group 2: all equal
    scores = torch.tensor([1.0, 2.0, 3.0, 6.0, 5.0, 5.0, 5.0, 5.0])
    std = math.sqrt(14 / 3) + 1e-4
    assert_close(ops.group_advantages(scores, 4), [-2 / std, -1 / std, 0.0, 3 / std, 0.0, 0.0, 0.0, 0.0], atol=1e-6)
    assert_close(ops.group_advantages(scores, 4, scale=False), [-2.0, -1.0, 0.0, 3.0, 0.0, 0.0, 0.0, 0.0])  # Dr. GRPO
    assert_close(ops.group_advantages(torch.tensor([1.0, 3.0, 10.0, 20.0]), 2, scale=False), [-1.0, 1.0, -5.0, 5.0])


def test_leave_one_out_advantages_hand_computed():
    # 1 - (2 + 3 + 6) / 3, 2 - (1 + 3 + 6) / 3, 3 - (1 + 2 + 6) / 3, 6 - (1 + 2 + 3) / 3
    assert_close(ops.leave_one_out_advantages(torch.tensor([1.0, 2.0, 3.0, 6.0]), 4), [-8 / 3, -4 / 3, 0.0, 4.0], atol=1e-6)
    assert_close(ops.leave_one_out_advantages(torch.tensor([1.0, 3.0, 7.0, 7.0]), 2), [-2.0, 2.0, 0.0, 0.0])


def test_group_estimators_match_a_slow_loop_on_random_scores():
    generator = torch.Generator().manual_seed(0)
    scores, K = torch.randn(24, generator=generator), 6
    for g in range(0, 24, K):
        group = scores[g : g + K].tolist()
        mean = sum(group) / K
        std = math.sqrt(sum((x - mean) ** 2 for x in group) / (K - 1))
        for i, x in enumerate(group):
            others = (sum(group) - x) / (K - 1)
            assert ops.group_advantages(scores, K)[g + i].item() == pytest.approx((x - mean) / (std + 1e-4), abs=1e-5)
            assert ops.leave_one_out_advantages(scores, K)[g + i].item() == pytest.approx(x - others, abs=1e-5)


def test_returns_to_go_hand_computed():
    rewards = torch.tensor([[1.0, 2.0, 3.0, 9.0]])
    mask = torch.tensor([[1, 1, 1, 0]])  # the 9 is after the response: it counts for nothing
    assert_close(ops.returns_to_go(rewards, mask), [[6.0, 5.0, 3.0, 0.0]])
    assert_close(ops.returns_to_go(rewards, mask, gamma=0.5), [[1 + 0.5 * (2 + 0.5 * 3), 2 + 0.5 * 3, 3.0, 0.0]])


def test_returns_to_go_match_a_slow_loop_on_random_batches():
    generator = torch.Generator().manual_seed(1)
    rewards = torch.randn(5, 7, generator=generator)
    lengths = [7, 3, 1, 5, 6]
    mask = torch.tensor([[1] * n + [0] * (7 - n) for n in lengths])
    returns = ops.returns_to_go(rewards, mask, gamma=0.9)
    for b, n in enumerate(lengths):
        for t in range(7):
            expected = sum(0.9 ** (u - t) * rewards[b, u].item() for u in range(t, n)) if t < n else 0.0
            assert returns[b, t].item() == pytest.approx(expected, abs=1e-5)


def test_kl_loss_hand_computed():
    # log pi = log 0.5, log pi_ref = log 0.25: k3 = 0.25 / 0.5 - 1 - log(0.25 / 0.5) = -0.5 + log 2
    logprobs, ref = torch.tensor([[math.log(0.5), math.log(0.5)]]), torch.tensor([[math.log(0.25), math.log(0.5)]])
    assert ops.kl_loss(logprobs, ref, torch.tensor([[1, 1]])).item() == pytest.approx((-0.5 + math.log(2)) / 2, abs=1e-6)
    assert ops.kl_loss(logprobs, ref, torch.tensor([[1, 0]]), num_tokens=4).item() == pytest.approx((-0.5 + math.log(2)) / 4, abs=1e-6)


def test_moments_of_shards_reduced_are_those_of_the_whole():
    x, mask = torch.tensor([[1.0, 2.0, 3.0], [4.0, 10.0, 0.0]]), torch.tensor([[1, 1, 1], [1, 1, 0]])
    mean, var = ops.moments(x, mask)
    assert mean.item() == pytest.approx(4.0) and var.item() == pytest.approx((9 + 4 + 1 + 0 + 36) / 4)
    totals = {}

    def reduce(t):  # the sums of both shards, as an all-reduce would give every process
        return totals["other"] + t

    totals["other"] = torch.stack([(x[1:] * mask[1:]).sum(), (x[1:] ** 2 * mask[1:]).sum(), mask[1:].sum()])
    shard_mean, shard_var = ops.moments(x[:1], mask[:1], reduce)
    assert shard_mean.item() == pytest.approx(4.0) and shard_var.item() == pytest.approx(12.5)
