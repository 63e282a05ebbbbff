"""Agreement statistics against values worked out by hand or published with the method."""

from __future__ import annotations

import pytest

from rlhf.label.agreement import cohen_kappa, krippendorff_alpha, pairwise_agreement, summarize

# Krippendorff (2011), "Computing Krippendorff's Alpha-Reliability", the worked example with
# 4 observers and 12 units (a dot is a missing value). Published: nominal 0.743, interval 0.849.
#   A: 1 2 3 3 2 1 4 1 2 . . .
#   B: 1 2 3 3 2 2 4 1 2 5 . 3
#   C: . 3 3 3 2 3 4 2 2 5 1 .
#   D: 1 2 3 3 2 4 4 1 2 5 1 .
KRIPPENDORFF_2011 = [
    [1, 1, 1], [2, 2, 3, 2], [3, 3, 3, 3], [3, 3, 3, 3], [2, 2, 2, 2], [1, 2, 3, 4],
    [4, 4, 4, 4], [1, 1, 2, 1], [2, 2, 2, 2], [5, 5, 5], [1, 1], [3],
]


def test_krippendorff_published_example():
    assert krippendorff_alpha(KRIPPENDORFF_2011, "nominal") == pytest.approx(0.743, abs=5e-4)
    assert krippendorff_alpha(KRIPPENDORFF_2011, "interval") == pytest.approx(0.849, abs=5e-4)


def test_nominal_alpha_by_hand():
    # Units (0,0,0) (0,1,0) (1,1,T) (0,0): coincidences o00 = 6, o01 = o10 = 1, o11 = 1,
    # o1T = oT1 = 1; n = 11 (n0 = 7, n1 = 3, nT = 1). D_o = 4/11, D_e = 62/110, alpha = 11/31.
    units = [[0, 0, 0], [0, 1, 0], [1, 1, "T"], [0, 0]]
    assert krippendorff_alpha(units, "nominal") == pytest.approx(11 / 31)


def test_interval_alpha_by_hand():
    # Two labelers, three items: (1, 2), (4, 4), (7, 6). n = 6 values, mean 4.
    # D_o = [(1-2)^2 * 2 + 0 + (7-6)^2 * 2] / 6 = 4/6.
    # D_e = sum over ordered pairs i != j of (x_i - x_j)^2 / (n (n-1)) = 2 n sum (x - mean)^2 / 30
    #     = 2 * 6 * (9 + 4 + 0 + 0 + 9 + 4) / 30 = 312 / 30 = 10.4.   alpha = 1 - (4/6) / 10.4.
    assert krippendorff_alpha([[1, 2], [4, 4], [7, 6]], "interval") == pytest.approx(1 - (4 / 6) / 10.4)


def test_alpha_edge_cases():
    assert krippendorff_alpha([[1, 1], [1, 1]]) is None  # no variation: undefined
    assert krippendorff_alpha([[1], [2]]) is None  # nothing pairable
    assert krippendorff_alpha([[0, 1], [1, 0]]) == pytest.approx(-0.5)  # D_o = 4/4, D_e = 8/12: worse than chance
    assert krippendorff_alpha([[0, 0], [1, 1]]) == 1.0


def test_cohen_kappa_by_hand():
    # 10 items; both say yes on 4, both no on 3, first yes/second no on 2, first no/second yes on 1.
    # p_o = 7/10; first yes 6/10, second yes 5/10: p_e = 0.6*0.5 + 0.4*0.5 = 0.5; kappa = 0.2/0.5.
    first = ["y"] * 4 + ["n"] * 3 + ["y"] * 2 + ["n"]
    second = ["y"] * 4 + ["n"] * 3 + ["n"] * 2 + ["y"]
    assert cohen_kappa(first, second) == pytest.approx(0.4)
    assert cohen_kappa(["y", "y"], ["y", "y"]) is None
    with pytest.raises(ValueError):
        cohen_kappa([1], [1, 2])


def test_pairwise_agreement_by_hand():
    assert pairwise_agreement([[0, 0, 1], [1, 1]]) == pytest.approx(2 / 4)  # (0,0) yes, (0,1) x2 no, (1,1) yes
    assert pairwise_agreement([[1]]) is None


def test_rankings_compare_rank_positions():
    # Two labelers rank three completions of one item: (0, 1, 2) and (1, 0, 2). Units per completion
    # hold its positions: c0 (0, 1), c1 (1, 0), c2 (2, 2). Interval: D_o = (1 + 1 + 1 + 1 + 0) / 6,
    # values 0,1,1,0,2,2 (mean 1, squares 1+0+0+1+1+1 = 4): D_e = 2*6*4 / 30 = 1.6.
    summary = summarize("rank", "thumbs", {1: {"a": (0, 1, 2), "b": (1, 0, 2)}})
    assert summary["metric"] == "interval"
    assert summary["alpha"] == pytest.approx(1 - (4 / 6) / 1.6)
    assert summary["agreement"] == 0.0
    assert [d["item"] for d in summary["disagreements"]] == [1]
    assert summary["pairs"][0]["kappa"] is None


def test_summary_of_thumbs_ratings():
    # Items: 1 (1, 1), 2 (0, 1), 3 (0, 0). alpha nominal: o11 = 2, o00 = 2, o01 = o10 = 1; n = 6, n0 = n1 = 3.
    # D_o = 2/6, D_e = 2*3*3 / 30 = 18/30, alpha = 1 - (1/3)/(3/5) = 4/9.
    # kappa: p_o = 2/3; a gave 1,0,0 (1/3 ones), b gave 1,1,0 (2/3 ones):
    # p_e = (1/3)(2/3) + (2/3)(1/3) = 4/9, kappa = (2/3 - 4/9) / (5/9) = 2/5.
    summary = summarize("rate", "thumbs", {1: {"a": 1, "b": 1}, 2: {"a": 0, "b": 1}, 3: {"a": 0, "b": 0}})
    assert summary["alpha"] == pytest.approx(4 / 9)
    (pair,) = summary["pairs"]
    assert pair["labelers"] == ("a", "b") and pair["shared"] == 3
    assert pair["kappa"] == pytest.approx(2 / 5)
    assert pair["alpha"] == pytest.approx(4 / 9)
