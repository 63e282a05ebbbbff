"""Which items to label: at random, or those whose order the reward model is least sure of.

Active choice needs a measure of the reward model's uncertainty. An ensemble of full reward
models would cost E trainings a round; instead the trained model's trunk is kept and E linear
heads are fitted on bootstrap resamples of the feedback so far, each from the model's own head,
on the trunk's features at the scored token ("last-layer" ensembles; the bootstrap follows
Christiano et al. 2017, who chose the comparisons an ensemble of predictors disagreed on most).
An item's uncertainty is the mean over its pairs of the heads' spread of P(i better than j).

    heads = bootstrap_heads(better, worse, w0, b0, members=8, seed=0)   # (E, H) and (E,)
    spread = pair_disagreement(heads, features_i, features_j)          # (N,)
"""

from __future__ import annotations

import itertools
import random

import torch

from rlhf.data import Content
from rlhf.encoding import pad


@torch.no_grad()
def trunk_features(score, prompts: list[Content], completions: list[Content], batch_size: int = 32) -> torch.Tensor:
    """(N, H) the reward model's hidden state at the token it scores, one row per completion.

    `score` is a `SequenceClassifierScore`; its head's input is read by a forward hook, so every
    architecture the classifier loads is covered without knowing its module names."""
    from rlhf.models import score_head

    model, captured = score.model, []
    handle = score_head(model).register_forward_hook(lambda module, args, output: captured.append(args[0]))
    sequences = [score.encode(p, c) for p, c in zip(prompts, completions)]
    device = next(model.parameters()).device
    parts = []
    try:
        for start in range(0, len(sequences), batch_size):
            ids, mask = pad(sequences[start : start + batch_size], score.tokenizer.pad_token_id)
            captured.clear()
            model(input_ids=ids.to(device), attention_mask=mask.to(device))
            hidden = captured[-1].float()  # (B, L, H), right-padded: the last real token is scored
            parts.append(hidden[torch.arange(len(ids)), mask.sum(-1).to(device) - 1].cpu())
    finally:
        handle.remove()
    return torch.cat(parts)


def bootstrap_heads(
    better: torch.Tensor, worse: torch.Tensor, weight: torch.Tensor, members: int, seed: int, steps: int = 200, l2: float = 1e-2
) -> torch.Tensor:
    """(E, H) linear heads, each fitted from `weight` (H,) on a bootstrap resample of the pairs.

    better, worse: (N, H) features of the preferred and the other completion of each labelled
    pair. Each head minimises the pairwise loss -log sigmoid(w . (better - worse)) on its resample,
    plus l2 * |w - weight|^2 so that where the data say nothing it stays the trained head (the
    bias cancels in a difference, so heads have none)."""
    generator = torch.Generator().manual_seed(seed)
    diff = better - worse
    n = len(diff)
    heads = []
    for _ in range(members):
        rows = torch.randint(n, (n,), generator=generator)
        w = weight.clone().requires_grad_(True)
        optimizer = torch.optim.LBFGS([w], max_iter=steps, line_search_fn="strong_wolfe")

        def closure():
            optimizer.zero_grad()
            loss = -torch.nn.functional.logsigmoid(diff[rows] @ w).mean() + l2 * (w - weight).square().sum()
            loss.backward()
            return loss

        optimizer.step(closure)
        heads.append(w.detach())
    return torch.stack(heads)


def pair_disagreement(heads: torch.Tensor, first: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
    """(N,) standard deviation over the E heads (E, H) of P(first better than second) for N pairs
    of features (N, H)."""
    return torch.sigmoid((first - second) @ heads.T).std(-1)


def item_pairs(sizes: list[int]) -> tuple[list[int], list[int], list[int]]:
    """(first, second, item) row indices of every pair within each item, the items' rows laid
    end to end: sizes [3, 2] give pairs (0,1) (0,2) (1,2) of item 0 and (3,4) of item 1."""
    first, second, item, offset = [], [], [], 0
    for index, size in enumerate(sizes):
        for i, j in itertools.combinations(range(size), 2):
            first.append(offset + i), second.append(offset + j), item.append(index)
        offset += size
    return first, second, item


def most_uncertain(uncertainty: torch.Tensor, n: int) -> list[int]:
    """Indices of the `n` largest values, largest first (ties by index)."""
    return sorted(range(len(uncertainty)), key=lambda i: (-uncertainty[i].item(), i))[:n]


def at_random(count: int, n: int, seed: int) -> list[int]:
    return random.Random(seed).sample(range(count), min(n, count))
