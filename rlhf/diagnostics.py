"""Signs that a policy has collapsed or over-optimised its reward model, in numbers and in words.

    metrics = diversity(completions)    # one policy's responses to different prompts
    for sentence in warnings({**metrics, "score": mean_score}, band=(p5, p95), gold_gap=0.5):
        print(sentence)

A collapsed policy gives the same response whatever the prompt asks; an over-optimised one has
found what the reward model overrates: its reward-model score rises past anything the model was
tested on, or the reward model's verdict parts from the gold one. PPO logs these numbers every
step (and `stop.min_distinct` stops a run on them); `rlhf eval` reports them per policy.
"""

from __future__ import annotations

from collections import Counter

# What healthy policies give, sampled at temperature 0.7 on the demo's held-out prompts (a few
# topics asked in many paraphrases), on 64 of them and on all 243. The SFT policy: 94 to 98 and
# 93 distinct responses per 100 prompts, its most common response 3% and 1% of all, 37% to 39%
# and 15% of its word pairs distinct. The PPO policy: 77 and 56 distinct per 100 (it answers
# paraphrases of one question alike), top share 6% and 3%, distinct-2 0.24 and 0.10. Distinct-2
# falls as responses grow in number, for the phrases of one domain recur; one response repeated
# over n prompts has a distinct-2 of 1 / n and a top share of 1. The thresholds lie well below
# the healthy numbers, so that they fire on a policy that says the same few things whatever it
# is asked. The demo's reward model scores its held-out completions from -5.6 to 3.0 (5th to 95th
# percentile) and the PPO policy's responses 1.4 on average. Over three seeds that policy wins
# 86% of prompts by the reward model and 81% by gold: a gap of 5 points, against 15 for the warning.

MIN_DISTINCT_PER_100 = 30.0
"""Warn when fewer than 30 of 100 responses are distinct: each given, on average, to more than three prompts."""
MAX_TOP_SHARE = 0.2
"""Warn when one response is more than a fifth of all: one answer to many different questions."""
MIN_DISTINCT_2 = 0.03
"""Warn when under 3% of the word pairs are distinct: about two responses repeated over 64 prompts."""
MAX_GOLD_GAP = 0.15
"""Warn when the reward model's win-rate over the reference passes the gold scorer's by more than this."""


def normalize(text: str) -> str:
    """A completion with its runs of whitespace made one space, stripped at both ends."""
    return " ".join(text.split())


def diversity(completions: list[str]) -> dict[str, float]:
    """How different a policy's responses are, each normalised first (`normalize`):

    distinct_per_100: distinct responses per 100 responses, 100 * distinct / n;
    top_share:        the share of the most common response;
    distinct_2:       distinct word bigrams over all bigrams of all responses, 0 without bigrams
                      (distinct-2, Li et al. 2016).
    """
    if not completions:
        raise ValueError("diversity needs at least one completion")
    texts = [normalize(c) for c in completions]
    counts = Counter(texts)
    bigrams = [pair for text in texts for pair in zip(text.split(), text.split()[1:])]
    return {
        "distinct_per_100": 100 * len(counts) / len(texts),
        "top_share": counts.most_common(1)[0][1] / len(texts),
        "distinct_2": len(set(bigrams)) / len(bigrams) if bigrams else 0.0,
    }


def signs(metrics: dict[str, float], band: tuple[float, float] | None = None, gold_gap: float | None = None) -> dict[str, str]:
    """Each sign of collapse or over-optimisation that the numbers show, by kind: `collapse`,
    `few_distinct`, `repetition`, `above_band`, `gold_gap`.

    `metrics` holds `diversity`'s numbers and, for the band, `score`, the mean reward-model
    score; a check whose number is missing is skipped. `band` is the reward model's
    (5th, 95th) percentile score on its held-out completions; `gold_gap` the reward model's
    win-rate against the reference minus the gold scorer's, both shares of the prompts.
    """
    found = {}
    # All distinct (100 per 100): the top response is one of n, a large share only when n is small.
    if metrics.get("top_share", 0.0) > MAX_TOP_SHARE and metrics.get("distinct_per_100", 100.0) < 100:
        found["collapse"] = f"{metrics['top_share']:.0%} of responses are one and the same text: the policy has collapsed onto one answer whatever the prompt"
    if metrics.get("distinct_per_100", 100.0) < MIN_DISTINCT_PER_100:
        found["few_distinct"] = f"only {metrics['distinct_per_100']:.0f} distinct responses per 100 prompts: the policy gives different prompts the same answers"
    if 0 < metrics.get("distinct_2", 1.0) < MIN_DISTINCT_2:  # 0: no word pairs at all, nothing to judge
        found["repetition"] = f"only {metrics['distinct_2']:.1%} of the word pairs in the responses are distinct: the responses repeat the same phrases"
    if band is not None and "score" in metrics and metrics["score"] > band[1]:
        found["above_band"] = (
            f"mean reward-model score {metrics['score']:.2f} is above {band[1]:.2f}, the 95th percentile of the held-out completions "
            "on which its accuracy was measured: the reward model is scoring outside what it was tested on"
        )
    if gold_gap is not None and gold_gap > MAX_GOLD_GAP:
        found["gold_gap"] = (
            f"the reward model prefers the policy to the reference on {100 * gold_gap:.0f} points more of the prompts than the gold "
            "scorer does: the policy is exploiting the reward model"
        )
    return found


def warnings(metrics: dict[str, float], band: tuple[float, float] | None = None, gold_gap: float | None = None) -> list[str]:
    """The sentences of `signs`, in its order; empty when nothing is wrong."""
    return list(signs(metrics, band, gold_gap).values())
