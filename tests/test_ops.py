"""The tensor math against hand-computed values and slow reference loops written here."""

from __future__ import annotations

import math

import pytest
import torch

from rlhf import ops


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
