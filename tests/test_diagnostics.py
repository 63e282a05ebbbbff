"""Diagnostics: diversity numbers on hand-counted completions, warnings that fire on a collapsed
policy's responses and stay quiet on a diverse one."""

from __future__ import annotations

import pytest

from rlhf.diagnostics import diversity, warnings


def test_diversity_counts_distinct_responses_top_share_and_distinct_bigrams():
    # 2 distinct of 3; "a b" twice; bigrams "a b", "a b", "c d", "d e": 3 distinct of 4
    assert diversity(["a b", "a b", "c d e"]) == {"distinct_per_100": pytest.approx(200 / 3), "top_share": pytest.approx(2 / 3), "distinct_2": 0.75}


def test_diversity_compares_completions_with_their_whitespace_normalised():
    # "  a  b\n" is "a b": 2 distinct of 3, bigrams "a b" twice and none in "c"
    assert diversity(["  a  b\n", "a b", "c"]) == {"distinct_per_100": pytest.approx(200 / 3), "top_share": pytest.approx(2 / 3), "distinct_2": 0.5}
    assert diversity(["a", "b"]) == {"distinct_per_100": 100.0, "top_share": 0.5, "distinct_2": 0.0}  # no bigrams at all


def test_warnings_fire_on_a_collapsed_policy():
    # 63 of 64 responses one sentence, one other: 2 distinct (3.1 per 100), top share 63/64;
    # bigrams: 4 * 63 of the sentence + 2 of the other = 254, of which 4 + 2 are distinct (2.4%)
    collapsed = ["Happy to help with that."] * 63 + ["answer one here"]
    assert warnings(diversity(collapsed)) == [
        "98% of responses are one and the same text: the policy has collapsed onto one answer whatever the prompt",
        "only 3 distinct responses per 100 prompts: the policy gives different prompts the same answers",
        "only 2.4% of the word pairs in the responses are distinct: the responses repeat the same phrases",
    ]
    # each threshold is a bound the numbers must pass
    assert warnings({"distinct_per_100": 30.0, "top_share": 0.2, "distinct_2": 0.03}) == []
    assert len(warnings({"distinct_per_100": 29.0, "top_share": 0.21, "distinct_2": 0.029})) == 3


def test_warnings_stay_quiet_on_a_diverse_policy():
    # 64 distinct responses; bigrams "reply number" and "to you" shared, "number i" and "i to"
    # distinct: 2 + 128 of 256
    diverse = [f"reply number {i} to you" for i in range(64)]
    assert diversity(diverse)["distinct_2"] == pytest.approx(130 / 256)
    assert warnings(diversity(diverse)) == []
    assert warnings(diversity(["yes", "no", "maybe", "sure", "ok"])) == []  # distinct one-word answers: no word pairs to judge
    assert warnings(diversity(["a b", "c d", "e f"])) == []  # each response a third of three, but none repeated
    assert warnings(diversity(["a b", "a b", "c d", "e f", "g h"])) == [
        "40% of responses are one and the same text: the policy has collapsed onto one answer whatever the prompt"
    ]


def test_a_mean_score_above_the_reward_models_band_is_a_warning():
    band = (-1.5, 2.1)
    assert warnings({"score": 3.21}, band=band) == [
        "mean reward-model score 3.21 is above 2.10, the 95th percentile of the held-out completions on which its accuracy "
        "was measured: the reward model is scoring outside what it was tested on"
    ]
    assert warnings({"score": 2.0}, band=band) == [] and warnings({"score": 3.21}) == []


def test_a_reward_model_win_rate_far_above_the_gold_one_is_a_warning():
    assert warnings({}, gold_gap=0.95 - 0.45) == [
        "the reward model prefers the policy to the reference on 50 points more of the prompts than the gold scorer does: "
        "the policy is exploiting the reward model"
    ]
    assert warnings({}, gold_gap=0.85 - 0.75) == [] and len(warnings({}, gold_gap=0.95 - 0.75)) == 1
