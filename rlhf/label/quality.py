"""Quality control of labelers: accuracy on gold items (known answers), time per item, side bias.

    stats = labeler_stats(store.project(), store.items(), store.live_answers(), store.answer_seconds())
    stats["alice"]["gold_accuracy"]   # share of her gold answers that were right, None before any

A gold item's answer is right when it is the known one: the better completion of a pair, the
whole order of a ranking, the label of a rating. Skips are left out; a tie on a gold pair is wrong.
"""

from __future__ import annotations

import random
import statistics
from collections.abc import Iterable

from rlhf.label.db import Answer, Item, Project

FLAG_ACCURACY = 0.7
"""Below this accuracy on gold items (with at least MIN_GOLD of them answered), a labeler is flagged."""
MIN_GOLD = 5


def display_order(item_id: int, labeler_id: int, size: int) -> list[int]:
    """The order in which a labeler sees an item's completions (shown position -> completion).

    Shuffled per labeler so that position bias (the left one looks better) averages out across
    labelers; seeded by the ids so that a reload shows the same order and the server can map the
    posted position back without trusting the form.
    """
    order = list(range(size))
    random.Random(f"{item_id}:{labeler_id}").shuffle(order)
    return order


def labeler_stats(project: Project, items: dict[int, Item], answers: list[Answer],
                  seconds: list[tuple[str, float]], names: Iterable[str] = ()) -> dict[str, dict]:
    """Per labeler name (those who answered, and `names`): gold_answered, gold_right,
    gold_accuracy, flagged, median_seconds and, for pairs, first_side (the share of their
    preferences for the completion shown as A)."""
    stats: dict[str, dict] = {}

    def of(name: str) -> dict:
        return stats.setdefault(name, {"gold_answered": 0, "gold_right": 0, "preferences": 0, "first": 0})

    for answer in answers:
        if answer.value is None:
            continue
        item, row = items[answer.item_id], of(answer.labeler)
        if item.gold is not None:
            row["gold_answered"] += 1
            row["gold_right"] += answer.value == item.gold
        if project.task == "pair" and answer.value != "tie":
            row["preferences"] += 1
            row["first"] += answer.value == display_order(item.id, answer.labeler_id, 2)[0]
    times: dict[str, list[float]] = {}
    for name, value in seconds:
        times.setdefault(name, []).append(value)
    for name in [*times, *names]:
        of(name)
    for name, row in stats.items():
        row["gold_accuracy"] = row["gold_right"] / row["gold_answered"] if row["gold_answered"] else None
        row["flagged"] = row["gold_answered"] >= MIN_GOLD and row["gold_accuracy"] < FLAG_ACCURACY
        row["median_seconds"] = statistics.median(times[name]) if name in times else None
        row["first_side"] = row["first"] / row["preferences"] if row["preferences"] else None
    return stats
