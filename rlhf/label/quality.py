"""Quality control of labelers: accuracy on gold items (known answers), time per item, side bias.

    stats = labeler_stats(store.project(), store.items(), store.live_answers(), store.answer_seconds())
    stats["alice"]["gold_accuracy"]   # share of her gold answers that were right, None before any

A gold item's answer is right when it is the known one: the better completion of a pair, the
whole order of a ranking, the label of a rating. Skips are left out; a tie on a gold pair is wrong.
"""

from __future__ import annotations

import json
import random
import statistics
from collections.abc import Iterable
from pathlib import Path

from rlhf.label.db import Answer, Item, Project, StoreError

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


def read_reward_eval(path: str | Path) -> list[dict]:
    """Per labeler, from a personal reward model's eval.json (`rlhf reward`, reward.personal on):
    rows {name, train_labels, weight, pairs, pooled_accuracy, own_accuracy, disagreements},
    sorted by how much better the labeler's own score does than the pooled one. A StoreError
    naming the file when it cannot be read or holds no labelers."""
    try:
        table = json.loads(Path(path).read_text(encoding="utf-8"))["labelers"]
        rows = []
        for name, entry in table.items():
            own = entry.get("own_accuracy")
            rows.append({
                "name": str(name), "train_labels": int(entry.get("train_labels", 0)), "weight": float(entry.get("weight", 0.0)),
                "pairs": int(entry["pairs"]), "pooled_accuracy": float(entry["pooled_accuracy"]),
                "own_accuracy": None if own is None else float(own),
                "disagreements": [
                    {"source": str(d["source"]), "pooled_margin": float(d["pooled_margin"]), "own_margin": float(d["own_margin"])}
                    for d in entry.get("disagreements", [])[:5]
                ],
            })
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise StoreError("invalid", f"cannot read the reward model's per-labeler evaluation {path}: {type(exc).__name__}: {exc}") from None
    if not rows:
        raise StoreError("invalid", f"{path} has no labelers: is it from a personal reward model (reward.personal.enabled)?")
    return sorted(rows, key=lambda r: -(r["own_accuracy"] - r["pooled_accuracy"] if r["own_accuracy"] is not None else 0.0))
