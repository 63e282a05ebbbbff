"""Answers out as the feedback records of `rlhf.data` that `rlhf reward` reads directly.

    pair    {"prompt", "chosen", "rejected", "labeler", "timestamp", "reason"?}
    rank    {"prompt", "completions": [best, ..., worst], "labeler", "timestamp", "reason"?}
    rate    {"prompt", "completion", "label", "labeler", "timestamp", "reason"?}   label: 0/1 or 1..7

The prompt is written as the candidates file gave it. After a conversational prompt (a list of
messages) each completion is written as TRL's conversational format has it,
[{"role": "assistant", "content": ...}], so that the file is all of one format.

Ties and skips carry no preference and are left out; so are undone answers and the answers to
gold (quality-control) items. Each record carries its labeler's accuracy on the gold items,
`gold_accuracy`, when they answered any; `min_gold_accuracy` leaves out every answer of a labeler
below it (or with no gold answers). `timestamp` is the time the answer was stored, in UTC (ISO 8601).
"""

from __future__ import annotations

import time
from collections import Counter
from pathlib import Path

from rlhf.data import write_jsonl
from rlhf.label.db import Store
from rlhf.label.quality import labeler_stats


def records(store: Store, min_gold_accuracy: float | None = None) -> tuple[list[dict], Counter]:
    project = store.project()
    if project is None:
        raise ValueError(f"{store.path} holds no labeling project")
    items, answers = store.items(), store.live_answers()
    stats = labeler_stats(project, items, answers, [])
    out, counts = [], Counter()
    for answer in answers:
        item = items[answer.item_id]
        accuracy = stats.get(answer.labeler, {}).get("gold_accuracy")
        if item.gold is not None:
            counts["gold answers"] += 1
            continue
        if min_gold_accuracy is not None and (accuracy is None or accuracy < min_gold_accuracy):
            counts["answers of labelers below the gold accuracy"] += 1
            continue
        if answer.value is None:
            counts["skips"] += 1
            continue
        if answer.value == "tie":
            counts["ties"] += 1
            continue
        record: dict = {"prompt": item.prompt}
        completions = [[{"role": "assistant", "content": c}] for c in item.completions] if isinstance(item.prompt, list) else item.completions
        if project.task == "pair":
            record["chosen"] = completions[answer.value]
            record["rejected"] = completions[1 - answer.value]
            counts["pairs"] += 1
        elif project.task == "rank":
            record["completions"] = [completions[c] for c in answer.value]
            counts["rankings"] += 1
        else:
            record["completion"] = completions[0]
            record["label"] = answer.value
            counts["ratings"] += 1
        record["labeler"] = answer.labeler
        if accuracy is not None:
            record["gold_accuracy"] = round(accuracy, 4)
        record["timestamp"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(answer.created_at))
        if answer.reason:
            record["reason"] = answer.reason
        out.append(record)
    return out, counts


def export(store: Store, path: str | Path, min_gold_accuracy: float | None = None) -> Counter:
    """Write the records to `path` (atomically); returns counts of what was written and left out."""
    out, counts = records(store, min_gold_accuracy)
    write_jsonl(path, out)
    return counts
