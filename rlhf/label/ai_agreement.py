"""How far AI labels agree with human ones, overall and per principle, with the statistics of the
labeling app's admin page (`rlhf.label.agreement`). Plain Python: records in, figures out
(`read_labels` reads a file through `rlhf.data.read_records`; nothing else touches a file).

    rlhf judge-agreement --ai ai_prefs.jsonl --human prefs.jsonl [--json agreement.json]
    rlhf label serve --db feedback.sqlite --ai-labels ai_prefs.jsonl    # the admin page shows it too

    ai = read_labels("ai_prefs.jsonl", ai=True)        # or read_judgements(rows) of (where, record) pairs
    humans = read_labels("prefs.jsonl", ai=False)
    reports = compare(ai, humans)          # one per AI labeler and task
    print(format_reports(reports))

An AI label (what `rlhf judge` writes) and a human one are of the same item when they have the
same prompt and the same completions, whichever order a record lists them in. Each record's
verdict is compared: for a pair the completion it prefers, for a ranking its whole order, for a
rating its score. Per principle the AI's verdict is the record's `principles` entry: a pair's
P(chosen better) above 0.5 prefers `chosen`, below prefers `rejected`, and 0.5 is no verdict; a
ranking's entry is its order (the completions' texts, best first); a rating's is its score. A
principle named "all" (one question quoting every principle) is the overall verdict itself and
gets no row of its own.

Per principle and overall, as the admin page computes them (skips and ties of humans are not in
the records and so not compared):
- agreement: the share of (item, human label) where the AI's verdict equals the human's, so an
  item with three human labels counts three times;
- Cohen's kappa between the AI and the humans' majority answer, for categories only (pairs,
  thumbs), as on the admin page; an item whose humans split evenly has no majority and is left
  out of kappa (`kappa_items` says how many items it used). A pair's two categories are its
  first and second completion in text order, which has nothing to do with which is better (as
  the admin page's item order has not); where the humans' majority is always the same one,
  kappa is 0 however often the AI agrees;
- Krippendorff's alpha with the AI as one more labeler beside the humans of each item (nominal
  for pairs and thumbs, interval for rank positions and 1-7 scores);
- items: how many items have both an AI verdict and a human label.

Ratings: the AI's are on the 1-7 scale (`rlhf judge --task rate`, possibly fractional: an
expected value). Against thumbs (0/1, the humans' labels all 0 or 1, or a thumbs project) the AI
gives thumbs up above 4, down below 4, and no verdict at 4; against 1-7 both sides are rounded to
the nearest whole number (halves up), as a labeler in the app answers.

For pairs the overall verdict is also broken down by the AI's confidence, in buckets
[0.5, 0.6) ... [0.9, 1.0], with for each bucket's lower edge what `rlhf judge --min-confidence`
at that value would keep: the number of items and their agreement.
"""

from __future__ import annotations

import bisect
import math
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

from rlhf.data import LOCAL_SUFFIXES, Comparison, Content, DataError, content_key, parse_feedback, read_records
from rlhf.label.agreement import cohen_kappa, krippendorff_alpha, metric_for

CONFIDENCE_EDGES = (0.5, 0.6, 0.7, 0.8, 0.9)
"""Lower edges of the confidence buckets of pairs; the last one, [0.9, 1.0], includes 1."""
OVERALL = "overall"


@dataclass(frozen=True)
class Judgement:
    """One labeler's verdict on one item, in a form that does not depend on the order in which
    the record listed the completions."""

    task: str
    """pair, rank or rate (a ranking of two completions is a pair)."""
    item: tuple
    """(task, prompt, completions): the prompt as canonical JSON and the completions' texts sorted."""
    value: Any
    """pair: the index in item[2] of the better completion; rank: the indices in item[2] best
    first (a tuple); rate: the score as the record gave it."""
    labeler: str
    source: str
    """file:line of the record."""
    confidence: float | None = None
    principles: dict[str, Any] = field(default_factory=dict)
    """The verdict under each principle alone, in the form of `value`; None: no verdict (P = 0.5)."""


# ---------------------------------------------------------------- records to judgements


def _key(content: Content) -> str:
    """A completion as one string to match on: its text, the same whether a file gives it as a
    string or, after a conversational prompt, as the one assistant message around it."""
    if isinstance(content, str):
        return content
    if len(content) == 1 and isinstance(content[0], dict) and content[0].get("role") == "assistant":
        return content[0]["content"]
    return content_key(content)


def _probability(value: Any, where: str, name: str, low: float, high: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or not low <= value <= high:
        raise DataError(where, f"expected a number from {low:g} to {high:g}, got {value!r}", name)
    return float(value)


def judgement(record: Any, where: str, ai: bool) -> Judgement:
    """The Judgement of one feedback record (`rlhf.data.parse_feedback` checks it). For an AI
    record (`ai`) its confidence and `principles` are read and checked too, and a rating must be
    on the 1-7 scale; a human record's other fields are ignored."""
    parsed = parse_feedback(record, where)
    confidence, raw_principles = None, {}
    if ai:
        if record.get("confidence") is not None:
            confidence = _probability(record["confidence"], where, "confidence", 0.0, 1.0)
        raw_principles = record.get("principles") or {}
        if not isinstance(raw_principles, dict):
            raise DataError(where, f"expected an object {{principle: verdict}}, got {type(raw_principles).__name__}", "principles")
    prompt = content_key(parsed.prompt)
    labeler = parsed.labeler or ("ai" if ai else "")
    principles: dict[str, Any] = {}
    if isinstance(parsed, Comparison):
        keys = [_key(c) for c in parsed.completions]
        texts = sorted(keys)
        order = tuple(texts.index(k) for k in keys)  # best first, as indices into the sorted texts
        if len(keys) == 2:
            if confidence is not None and confidence < 0.5:
                raise DataError(where, f"a pair's confidence is the probability of its verdict, from 0.5 to 1, got {confidence!r}", "confidence")
            for name, p in raw_principles.items():
                p = _probability(p, where, f"principles.{name}", 0.0, 1.0)
                principles[str(name)] = order[0] if p > 0.5 else order[1] if p < 0.5 else None
            return Judgement("pair", ("pair", prompt, tuple(texts)), order[0], labeler, where, confidence, principles)
        for name, listed in raw_principles.items():
            if not isinstance(listed, list) or sorted(_key(c) if isinstance(c, (str, list)) else repr(c) for c in listed) != texts:
                raise DataError(where, "expected the record's completions in this principle's order, best first", f"principles.{name}")
            principles[str(name)] = tuple(texts.index(_key(c)) for c in listed)
        return Judgement("rank", ("rank", prompt, tuple(texts)), order, labeler, where, confidence, principles)
    if ai:
        _probability(parsed.label, where, "label", 1.0, 7.0)
        for name, score in raw_principles.items():
            principles[str(name)] = _probability(score, where, f"principles.{name}", 1.0, 7.0)
    return Judgement("rate", ("rate", prompt, (_key(parsed.completion),)), parsed.label, labeler, where, confidence, principles)


def read_judgements(rows: Iterable[tuple[str, Any]], ai: bool) -> list[Judgement]:
    """The Judgements of (where, record) pairs, as `rlhf.data.read_records` yields them; the
    first bad record raises its DataError (file, line and field), and so does a file without any."""
    judgements, first = [], None
    for where, record in rows:
        first = first or where
        judgements.append(judgement(record, where, ai))
    if not judgements:
        raise DataError(first or "the file", "no records")
    return judgements


def read_labels(path: str | Path, ai: bool) -> list[Judgement]:
    """The Judgements of a local feedback file (`rlhf.data.read_records` reads it; never a hub name)."""
    if Path(path).suffix not in LOCAL_SUFFIXES:
        raise DataError(str(path), f"a labels file ends in one of {', '.join(LOCAL_SUFFIXES)}")
    return read_judgements(read_records(path), ai)


# ---------------------------------------------------------------- the statistics


def _whole(x: float) -> int:
    return math.floor(x + 0.5)


def _on_scale(value: Any, task: str, scale: str, ai: bool) -> Any:
    """A verdict as the comparison reads it: ratings on the humans' scale (see the module's
    docstring); None for no verdict."""
    if value is None or task != "rate":
        return value
    if scale == "thumbs":
        return (1 if value > 4 else 0 if value < 4 else None) if ai else int(value)
    return _whole(value)


def _majority(values: list) -> Any:
    """The value given most often, or None when two values are given equally often."""
    top = Counter(values).most_common(2)
    return None if len(top) == 2 and top[0][1] == top[1][1] else top[0][0]


def figures(task: str, metric: str, compared: list[tuple[Any, list]]) -> dict:
    """Figures for (AI verdict, [human verdicts]) per item: items, human_labels, agreement,
    kappa (None for an interval metric), kappa_items and alpha. None where undefined."""
    labels = sum(len(humans) for _, humans in compared)
    same = sum(ai == human for ai, humans in compared for human in humans)
    kappa, kappa_items = None, 0
    if metric == "nominal":
        majorities = [(ai, _majority(humans)) for ai, humans in compared]
        majorities = [(ai, m) for ai, m in majorities if m is not None]
        kappa_items = len(majorities)
        kappa = cohen_kappa([ai for ai, _ in majorities], [m for _, m in majorities])
    units = []
    for ai, humans in compared:
        if task == "rank":  # one unit per completion: the position each labeler gave it
            units.extend([order.index(c) for order in [*humans, ai]] for c in range(len(ai)))
        else:
            units.append([*humans, ai])
    return {
        "items": len(compared), "human_labels": labels, "agreement": same / labels if labels else None,
        "kappa": kappa, "kappa_items": kappa_items, "alpha": krippendorff_alpha(units, metric) if compared else None,
    }


def _bucket_name(i: int) -> str:
    low = CONFIDENCE_EDGES[i]
    return f"[{low:.1f}, 1.0]" if i == len(CONFIDENCE_EDGES) - 1 else f"[{low:.1f}, {CONFIDENCE_EDGES[i + 1]:.1f})"


def compare(ai: list[Judgement], humans: list[Judgement], scale: str | None = None) -> list[dict]:
    """One report per AI labeler and task, AI labelers in the order they first appear.

    `scale` is the humans' rating scale (thumbs or 1-7, as a labeling project has it); None reads
    it from their labels: thumbs when every one is 0 or 1. A report: labeler, task, metric, scale,
    human_labelers, rows (overall, then one per principle: principle and the figures of
    `figures`), confidence (pairs: per bucket its figures plus min_confidence_items and
    min_confidence_agreement), ai_only (the AI's items without a human label), human_only, repeated
    (the AI's later labels of an item it had labelled, left out) and no_verdict (per principle).
    """
    by_item: dict[tuple, list[Judgement]] = {}
    for h in humans:
        by_item.setdefault(h.item, []).append(h)
    if scale is None:
        rated = [h.value for h in humans if h.task == "rate"]
        scale = "thumbs" if rated and all(v in (0, 1) for v in rated) else "1-7"
    groups: dict[tuple[str, str], list[Judgement]] = {}
    for j in ai:
        groups.setdefault((j.labeler, j.task), []).append(j)
    reports = []
    for (labeler, task), judgements in groups.items():
        metric = metric_for(task, scale)
        seen, repeated = {}, 0
        for j in judgements:
            if j.item in seen:
                repeated += 1
            else:
                seen[j.item] = j
        principles = list(dict.fromkeys(n for j in seen.values() for n in j.principles if n != "all"))
        compared: dict[str, list] = {name: [] for name in [OVERALL, *principles]}
        confident: list[tuple[float, Any, list]] = []
        no_verdict: Counter = Counter()
        for item, j in seen.items():
            if item not in by_item:
                continue
            human_values = [_on_scale(h.value, task, scale, ai=False) for h in by_item[item]]
            verdicts = {OVERALL: j.value, **{n: j.principles[n] for n in principles if n in j.principles}}
            for name, verdict in verdicts.items():
                verdict = _on_scale(verdict, task, scale, ai=True)
                if verdict is None:
                    no_verdict[name] += 1
                else:
                    compared[name].append((verdict, human_values))
            if task == "pair" and j.confidence is not None:
                confident.append((j.confidence, j.value, human_values))
        rows = [{"principle": name, **figures(task, metric, pairs)} for name, pairs in compared.items()]
        buckets = []
        if task == "pair":
            for i, low in enumerate(CONFIDENCE_EDGES):
                inside = [(v, h) for c, v, h in confident if bisect.bisect_right(CONFIDENCE_EDGES, c) - 1 == i]
                kept = [(v, h) for c, v, h in confident if c >= low]
                kept_stats = figures(task, metric, kept)
                buckets.append({"bucket": _bucket_name(i), "low": low, **figures(task, metric, inside),
                                "min_confidence_items": kept_stats["items"], "min_confidence_agreement": kept_stats["agreement"]})
        human_labelers = sorted({h.labeler for item in seen if item in by_item for h in by_item[item]})
        reports.append({
            "labeler": labeler, "task": task, "metric": metric, "scale": scale if task == "rate" else None,
            "human_labelers": human_labelers, "rows": rows, "confidence": buckets,
            "ai_only": sum(item not in by_item for item in seen),
            "human_only": sum(1 for item in by_item if item[0] == task and item not in seen),
            "repeated": repeated, "no_verdict": dict(no_verdict),
        })
    return reports


# ---------------------------------------------------------------- as text


def _percent(value: float | None) -> str:
    return "—" if value is None else f"{100 * value:.0f}%"


def _fraction(value: float | None) -> str:
    return "—" if value is None else f"{value:.3f}"


def _table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]

    def line(cells: list[str]) -> str:  # the first column to the left, numbers to the right
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))

    return "\n".join(line(r) for r in [header, *rows])


def format_reports(reports: list[dict], ai_source: str = "", human_source: str = "") -> str:
    """The reports as the tables the command prints (and the admin page shows)."""
    out = []
    for r in reports:
        scale = f", {r['scale']}" if r["scale"] else ""
        who = ", ".join(r["human_labelers"]) or "no one"
        out.append(f"{r['labeler']} ({r['task']}s{scale}; {r['metric']} alpha)"
                   + (f" from {ai_source}" if ai_source else "") + f" against {who}" + (f" in {human_source}" if human_source else ""))
        kappa = r["metric"] == "nominal"
        header = ["principle", "items", "agreement", *(["kappa"] if kappa else []), "alpha"]
        out.append(_table(header, [[row["principle"], str(row["items"]), _percent(row["agreement"]),
                                    *([_fraction(row["kappa"])] if kappa else []), _fraction(row["alpha"])] for row in r["rows"]]))
        if r["confidence"]:
            out.append("")
            out.append(_table(
                ["confidence", "items", "agreement", "kappa", "alpha", "at --min-confidence: items", "agreement"],
                [[b["bucket"], str(b["items"]), _percent(b["agreement"]), _fraction(b["kappa"]), _fraction(b["alpha"]),
                  str(b["min_confidence_items"]), _percent(b["min_confidence_agreement"])] for b in r["confidence"]],
            ))
        notes = [f"AI labels without a human one: {r['ai_only']}; human-labelled items without an AI label: {r['human_only']}"]
        if r["repeated"]:
            notes.append(f"repeated AI labels, left out: {r['repeated']}")
        if r["no_verdict"]:
            notes.append("no verdict (P = 0.5 or a rating of 4 against thumbs): "
                         + ", ".join(f"{n} {c}" for n, c in r["no_verdict"].items()))
        if kappa:
            notes.append("kappa: against the humans' majority; items where they split evenly are left out of it: "
                         f"{r['rows'][0]['items'] - r['rows'][0]['kappa_items']} (overall)")
        out.extend(notes)
        out.append("")
    return "\n".join(out).rstrip() + "\n"
