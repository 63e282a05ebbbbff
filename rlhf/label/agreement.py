"""Agreement between labelers: Krippendorff's alpha and Cohen's kappa. Plain Python, no I/O.

    krippendorff_alpha([[0, 0, 1], [1, 1], [0, 1]], metric="nominal")
    cohen_kappa(["a", "b", "a"], ["a", "b", "b"])

A *unit* is one thing that several labelers judged (an item, or one completion of a ranked
item); its list holds the values they gave, with skips left out. Units with fewer than two values
cannot be compared and do not count.
"""

from __future__ import annotations

import itertools
from collections import Counter
from typing import Hashable, Literal, Sequence

Metric = Literal["nominal", "interval"]


def _delta(a, b, metric: Metric) -> float:
    """The squared difference function of Krippendorff (2011): 0/1 for nominal, (a-b)^2 for interval."""
    if metric == "nominal":
        return 0.0 if a == b else 1.0
    return float(a - b) ** 2


def krippendorff_alpha(units: Sequence[Sequence[Hashable]], metric: Metric = "nominal") -> float | None:
    """alpha = 1 - D_o / D_e, with the coincidence counts of Krippendorff,
    "Computing Krippendorff's Alpha-Reliability" (2011), for any number of labelers and missing values.

    D_o: mean disagreement between values of the same unit, each unit's pairs weighted 1/(m_u - 1);
    D_e: mean disagreement between any two of the n pairable values. Returns None when every value
    is the same (D_e = 0: alpha is undefined) or nothing is pairable.
    """
    pairable = [list(u) for u in units if len(u) >= 2]
    n = sum(len(u) for u in pairable)
    if n < 2:
        return None
    observed = 0.0
    for values in pairable:
        m = len(values)
        # The plain sum over ordered pairs of different labelers (i != j) in the unit.
        within = sum(_delta(values[i], values[j], metric) for i in range(m) for j in range(m) if i != j)
        observed += within / (m - 1)
    observed /= n
    # Expected disagreement from the value totals n_c: sum over ordered pairs of distinct values.
    totals = Counter(v for values in pairable for v in values)
    expected = sum(nc * nk * _delta(c, k, metric) for c, nc in totals.items() for k, nk in totals.items())
    expected /= n * (n - 1)
    if expected == 0:
        return None
    return 1.0 - observed / expected


def cohen_kappa(first: Sequence[Hashable], second: Sequence[Hashable]) -> float | None:
    """(p_o - p_e) / (1 - p_e) for two labelers' values on the same items (Cohen 1960).

    p_o is the share of items where they agree, p_e the agreement expected from each labeler's own
    value frequencies. None when there is nothing to compare or p_e = 1 (both always gave one value).
    """
    if len(first) != len(second):
        raise ValueError(f"two labelers' values must align: {len(first)} vs {len(second)}")
    n = len(first)
    if n == 0:
        return None
    agreed = sum(a == b for a, b in zip(first, second, strict=True)) / n
    count_first, count_second = Counter(first), Counter(second)
    chance = sum(count_first[v] * count_second[v] for v in count_first) / (n * n)
    if chance == 1:
        return None
    return (agreed - chance) / (1 - chance)


def pairwise_agreement(units: Sequence[Sequence[Hashable]]) -> float | None:
    """Share of (unit, pair of labelers) where the two gave the same value; None when no pairs."""
    agreed = pairs = 0
    for values in units:
        for i in range(len(values)):
            for j in range(i + 1, len(values)):
                pairs += 1
                agreed += values[i] == values[j]
    return agreed / pairs if pairs else None


# ---------------------------------------------------------------- from a project's answers


def metric_for(task: str, scale: str) -> Metric:
    """Choices and thumbs are categories; 1-7 scores and rank positions are numbers."""
    if task == "pair" or (task == "rate" and scale == "thumbs"):
        return "nominal"
    return "interval"


def _units(task: str, answers: dict[int, dict[str, object]], labelers: set[str] | None = None) -> list[list]:
    """Alpha's units: one per item, or for a ranking one per (item, completion) holding the
    position each labeler gave that completion."""
    units = []
    for by_labeler in answers.values():
        values = [v for name, v in sorted(by_labeler.items()) if labelers is None or name in labelers]
        if task == "rank":
            size = len(values[0]) if values else 0
            units.extend([order.index(c) for order in values] for c in range(size))
        else:
            units.append(values)
    return units


def summarize(task: str, scale: str, answers: dict[int, dict[str, object]]) -> dict:
    """The admin page's agreement figures from {item id: {labeler: value}}, skips left out.

    Values must be hashable (a ranking as a tuple). Returns the project's alpha and pairwise
    agreement, one row per pair of labelers who answered common items (their alpha, and Cohen's
    kappa for categories), and the items where labelers disagree, least agreement first.
    """
    metric = metric_for(task, scale)
    items = {item: dict(by) for item, by in answers.items() if by}
    names = sorted({name for by in items.values() for name in by})
    pairs = []
    for first, second in itertools.combinations(names, 2):
        shared = [item for item, by in items.items() if first in by and second in by]
        if not shared:
            continue
        a = [items[i][first] for i in shared]
        b = [items[i][second] for i in shared]
        pairs.append(
            {
                "labelers": (first, second),
                "shared": len(shared),
                "agreement": sum(x == y for x, y in zip(a, b, strict=True)) / len(shared),
                "alpha": krippendorff_alpha(_units(task, {i: items[i] for i in shared}, {first, second}), metric),
                "kappa": cohen_kappa(a, b) if metric == "nominal" else None,
            }
        )
    disagreements = []
    for item, by in items.items():
        if len(by) >= 2 and len(set(by.values())) > 1:
            disagreements.append({"item": item, "agreement": pairwise_agreement([list(by.values())]), "answers": by})
    disagreements.sort(key=lambda d: (d["agreement"], d["item"]))
    return {
        "metric": metric,
        "alpha": krippendorff_alpha(_units(task, items), metric),
        "agreement": pairwise_agreement([list(by.values()) for by in items.values()]),
        "multiply_labeled": sum(len(by) >= 2 for by in items.values()),
        "pairs": pairs,
        "disagreements": disagreements,
    }
