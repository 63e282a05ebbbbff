"""AI labels against human ones (rlhf.label.ai_agreement and `rlhf judge-agreement`): figures
worked out by hand in each test's docstring, items matched whichever order their completions
come in, and bad files named by file, line and field."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from rlhf.data import DataError, read_records
from rlhf.label.ai_agreement import compare, format_reports, read_judgements

ROOT = Path(__file__).resolve().parents[1]


def write(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def load(path: Path, ai: bool):
    return read_judgements(read_records(path), ai=ai)


def pair(i: int, better: str, labeler: str, **extra) -> dict:
    """Item i's pair: completions "an answer i" (a) and "the other answer i" (b)."""
    a, b = f"an answer {i}", f"the other answer {i}"
    chosen, rejected = (a, b) if better == "a" else (b, a)
    return {"prompt": f"Question {i}?", "chosen": chosen, "rejected": rejected, "labeler": labeler, **extra}


HUMANS = [  # item: the better completion by each human
    pair(1, "a", "alice"), pair(1, "a", "bob"),
    pair(2, "a", "alice"), pair(2, "b", "bob"),
    pair(3, "b", "alice"),
    pair(4, "b", "alice"), pair(4, "b", "bob"), pair(4, "a", "carol"),
    pair(6, "a", "alice"),  # no AI label
]
AI = [  # the AI's verdict, its confidence, and P(chosen better) under each principle
    pair(1, "a", "ai:judge", confidence=0.95, principle="helpful", principles={"helpful": 0.9, "harmless": 0.5}),
    pair(2, "a", "ai:judge", confidence=0.6, principle="harmless", principles={"helpful": 0.2, "harmless": 0.7}),
    pair(3, "a", "ai:judge", confidence=0.55, principle="helpful", principles={"helpful": 0.6, "harmless": 0.3}),
    pair(4, "b", "ai:judge", confidence=0.85, principle="harmless", principles={"helpful": 0.8, "harmless": 0.1, "all": 0.2}),
    pair(5, "a", "ai:judge", confidence=0.75, principle="helpful", principles={"helpful": 0.7, "harmless": 0.7}),  # no human label
    pair(1, "b", "ai:judge", confidence=0.99, principle="helpful", principles={"helpful": 0.9, "harmless": 0.9}),  # a repeat: left out
]


def test_pairs_overall_per_principle_and_by_confidence(tmp_path):
    """Values: 0 = completion a (the first by text), 1 = b.

                   item 1   item 2   item 3   item 4
        humans     0 0      0 1      1        1 1 0
        AI         0        0        0        1         confidence .95 .6 .55 .85
        helpful    0        1        0        1         (P > 0.5: chosen; item 2's chosen is a, so 0.2 means b)
        harmless   -        0        1        0         (0.5: no verdict)

    Overall. Agreement against each human label: 2 + 1 + 0 + 2 of 8 = 5/8.
    Kappa against the majority: item 2 splits evenly and is left out; items 1, 3, 4: AI 0 0 1,
    majority 0 1 1: p_o = 2/3, p_e = (2/3)(1/3) + (1/3)(2/3) = 4/9, kappa = (2/9) / (5/9) = 0.4.
    Alpha, the AI one more labeler: units [0 0 0] [0 1 0] [1 0] [1 1 0 1], n = 12 (seven 0s, five
    1s). Disagreeing ordered pairs / (m - 1) per unit: 0, 4/2, 2/1, 6/3: D_o = 6/12;
    D_e = 2 * 7 * 5 / (12 * 11) = 70/132; alpha = 1 - 66/70 = 4/70.

    helpful: agreement 2 + 1 + 0 + 2 of 8 = 5/8; kappa on items 1, 3, 4 (0 0 1 against 0 1 1) = 0.4;
    units [0 0 0] [0 1 1] [1 0] [1 1 0 1], six 0s and six 1s: D_o = 6/12, D_e = 72/132, alpha = 1/12.
    harmless (items 2, 3, 4): agreement 1 + 1 + 1 of 2 + 1 + 3 = 1/2; kappa on items 3, 4 (1 0
    against 1 1): p_o = 1/2, p_e = 1/2, kappa = 0; units [0 1 0] [1 1] [1 1 0 0], n = 9 (four 0s):
    D_o = (4/2 + 0 + 8/3) / 9 = 14/27, D_e = 2 * 4 * 5 / 72 = 5/9, alpha = 1 - 14/15 = 1/15.
    "all" is the overall verdict and has no row.

    By confidence: [0.5, 0.6) item 3: 0 of 1; [0.6, 0.7) item 2 (0.6 is the bucket's lower edge):
    1 of 2; [0.7, 0.8) none (item 5 has no human label); [0.8, 0.9) item 4: 2 of 3; [0.9, 1.0]
    item 1: 2 of 2. At --min-confidence 0.6: items 1, 2, 4, (2 + 1 + 2) / 7; at 0.7 and 0.8:
    items 1 and 4, 4/5; at 0.9: item 1, 1.
    """
    [report] = compare(load(write(tmp_path / "ai.jsonl", AI), ai=True), load(write(tmp_path / "human.jsonl", HUMANS), ai=False))
    assert (report["labeler"], report["task"], report["metric"]) == ("ai:judge", "pair", "nominal")
    assert report["human_labelers"] == ["alice", "bob", "carol"]
    rows = {row["principle"]: row for row in report["rows"]}
    assert list(rows) == ["overall", "helpful", "harmless"]
    expected = {"overall": (4, 8, 5 / 8, 0.4, 3, 4 / 70), "helpful": (4, 8, 5 / 8, 0.4, 3, 1 / 12), "harmless": (3, 6, 1 / 2, 0.0, 2, 1 / 15)}
    for name, (items, labels, agreement, kappa, kappa_items, alpha) in expected.items():
        row = rows[name]
        assert (row["items"], row["human_labels"], row["kappa_items"]) == (items, labels, kappa_items), name
        assert row["agreement"] == pytest.approx(agreement), name
        assert row["kappa"] == pytest.approx(kappa, abs=1e-12), name
        assert row["alpha"] == pytest.approx(alpha), name
    assert report["no_verdict"] == {"harmless": 1}
    assert (report["ai_only"], report["human_only"], report["repeated"]) == (1, 1, 1)

    buckets = {b["bucket"]: b for b in report["confidence"]}
    assert list(buckets) == ["[0.5, 0.6)", "[0.6, 0.7)", "[0.7, 0.8)", "[0.8, 0.9)", "[0.9, 1.0]"]
    assert [b["items"] for b in buckets.values()] == [1, 1, 0, 1, 1]
    agreements = [b["agreement"] for b in buckets.values()]
    assert agreements[2] is None  # nothing in [0.7, 0.8)
    assert [agreements[i] for i in (0, 1, 3, 4)] == pytest.approx([0, 1 / 2, 2 / 3, 1])
    assert [b["min_confidence_items"] for b in buckets.values()] == [4, 3, 2, 2, 1]
    assert [b["min_confidence_agreement"] for b in buckets.values()] == pytest.approx([5 / 8, 5 / 7, 4 / 5, 4 / 5, 1])

    text = format_reports([report], "ai.jsonl", "human.jsonl")
    assert "ai:judge (pairs; nominal alpha) from ai.jsonl against alice, bob, carol in human.jsonl" in text
    assert "harmless       3        50%  0.000  0.067" in text
    assert "AI labels without a human one: 1; human-labelled items without an AI label: 1" in text


def test_a_pair_is_the_same_item_whichever_order_and_format_its_completions_come_in(tmp_path):
    """The app exports a conversation's completions as [{"role": "assistant", ...}]; `rlhf judge`
    writes the candidates' strings. Item 1's humans list the completions the other way round."""
    conversation = [{"role": "user", "content": "Hi, where is my order?"}]
    humans = [
        {"prompt": conversation, "chosen": [{"role": "assistant", "content": "It ships today."}],
         "rejected": [{"role": "assistant", "content": "No idea."}], "labeler": "alice"},
        pair(1, "b", "bob"),
    ]
    ai = [
        {"prompt": conversation, "chosen": "It ships today.", "rejected": "No idea.", "labeler": "ai:judge", "confidence": 0.9},
        pair(1, "a", "ai:judge", confidence=0.7),
    ]
    [report] = compare(load(write(tmp_path / "ai.jsonl", ai), True), load(write(tmp_path / "h.jsonl", humans), False))
    overall = report["rows"][0]
    assert (overall["items"], overall["agreement"]) == (2, 1 / 2)
    assert report["ai_only"] == report["human_only"] == 0


def test_rankings_compare_whole_orders_and_rank_positions(tmp_path):
    """Completions p, q, r (indices 0, 1, 2 by text), best first:

        item 1: alice p q r (0 1 2), bob q p r (1 0 2), AI p q r (0 1 2), AI's helpful q p r
        item 2: alice r q p (2 1 0),                    AI q r p (1 2 0), AI's helpful r q p

    Agreement (the same whole order): 1 of 2 + 0 of 1 = 1/3; helpful: 1 + 1 of 3 = 2/3.
    Alpha (interval) on positions, one unit per completion: item 1 [0 1 0] [1 0 1] [2 2 2],
    item 2 [2 2] [1 0] [0 1]; n = 15, five each of 0, 1, 2. D_o = (4/2 + 4/2 + 0 + 0 + 2 + 2) / 15
    = 8/15; D_e = 2 * 25 * (1 + 4 + 1) / (15 * 14) = 10/7; alpha = 1 - 56/150 = 94/150.
    No kappa: positions are numbers (as on the admin page).
    """
    def rank(i, order, labeler, **extra):
        return {"prompt": f"Rank {i}", "completions": [f"{c} {i}" for c in order], "labeler": labeler, **extra}

    humans = [rank(1, "pqr", "alice"), rank(1, "qpr", "bob"), rank(2, "rqp", "alice")]
    ai = [rank(1, "pqr", "ai:judge", confidence=0.8, principles={"helpful": ["q 1", "p 1", "r 1"]}),
          rank(2, "qrp", "ai:judge", confidence=0.6, principles={"helpful": ["r 2", "q 2", "p 2"]})]
    [report] = compare(load(write(tmp_path / "ai.jsonl", ai), True), load(write(tmp_path / "h.jsonl", humans), False))
    assert (report["task"], report["metric"], report["confidence"]) == ("rank", "interval", [])
    overall, helpful = report["rows"]
    assert (overall["items"], overall["agreement"], overall["kappa"]) == (2, pytest.approx(1 / 3), None)
    assert overall["alpha"] == pytest.approx(94 / 150)
    assert (helpful["principle"], helpful["agreement"]) == ("helpful", pytest.approx(2 / 3))
    assert "kappa" not in format_reports([report]).splitlines()[1]


def test_ratings_go_on_the_humans_scale(tmp_path):
    """Against thumbs: the AI's 1-7 score is up above 4, down below, no verdict at 4.

        item 1: humans 1 1, AI 5.6 (up)    item 2: human 0, AI 4.0 (no verdict)
        item 3: humans 1 0, AI 2.5 (down)  item 4: humans 0 0, AI 3.9 (down)

    Agreement 2 + 1 + 2 of 6 = 5/6. Kappa: item 3 splits evenly; items 1, 4: 1 0 against 1 0,
    p_o = 1, p_e = 1/2, kappa = 1. Alpha (nominal): [1 1 1] [1 0 0] [0 0 0], n = 9 (four 1s):
    D_o = (4/2) / 9, D_e = 2 * 4 * 5 / 72 = 5/9, alpha = 1 - 2/5 = 0.6.

    Against 1-7 both are rounded, halves up: human 5 and AI 4.5 (5), human 3 and AI 3.4 (3), human 6
    and AI 2.0: agreement 2/3; alpha (interval) [5 5] [3 3] [6 2], mean 4: D_o = 2 * 16 / 6,
    D_e = 2 * 6 * (1 + 1 + 1 + 1 + 4 + 4) / 30 = 4.8, alpha = 1 - (32/6) / 4.8 = -1/9.
    """
    def rate(i, label, labeler, **extra):
        return {"prompt": f"Rate {i}", "completion": f"reply {i}", "label": label, "labeler": labeler, **extra}

    thumbs = [rate(1, 1, "alice"), rate(1, 1, "bob"), rate(2, 0, "alice"), rate(3, 1, "alice"), rate(3, 0, "bob"),
              rate(4, 0, "alice"), rate(4, 0, "bob")]
    ai = [rate(1, 5.6, "ai:judge"), rate(2, 4.0, "ai:judge"), rate(3, 2.5, "ai:judge"), rate(4, 3.9, "ai:judge")]
    [report] = compare(load(write(tmp_path / "ai.jsonl", ai), True), load(write(tmp_path / "thumbs.jsonl", thumbs), False))
    overall = report["rows"][0]
    assert (report["scale"], report["metric"], report["no_verdict"]) == ("thumbs", "nominal", {"overall": 1})
    assert (overall["items"], overall["kappa_items"]) == (3, 2)
    assert (overall["agreement"], overall["kappa"], overall["alpha"]) == (pytest.approx(5 / 6), pytest.approx(1.0), pytest.approx(0.6))

    scores = [rate(1, 5, "alice"), rate(2, 3, "alice"), rate(3, 6, "alice")]
    ai = [rate(1, 4.5, "ai:judge"), rate(2, 3.4, "ai:judge"), rate(3, 2.0, "ai:judge")]
    [report] = compare(load(write(tmp_path / "ai7.jsonl", ai), True), load(write(tmp_path / "scores.jsonl", scores), False))
    overall = report["rows"][0]
    assert (report["scale"], report["metric"], overall["kappa"]) == ("1-7", "interval", None)
    assert (overall["agreement"], overall["alpha"]) == (pytest.approx(2 / 3), pytest.approx(-1 / 9))


@pytest.mark.parametrize("record, where", [
    ({**pair(1, "a", "ai:judge"), "principles": {"helpful": 1.5}}, "field 'principles.helpful': expected a number from 0 to 1, got 1.5"),
    ({**pair(1, "a", "ai:judge"), "confidence": 0.3}, "field 'confidence': a pair's confidence is the probability of its verdict, from 0.5 to 1"),
    ({**pair(1, "a", "ai:judge"), "principles": ["helpful"]}, "field 'principles': expected an object {principle: verdict}, got list"),
    ({"prompt": "p", "completions": ["x", "y", "z"], "labeler": "ai:judge", "principles": {"helpful": ["x", "y"]}},
     "field 'principles.helpful': expected the record's completions in this principle's order"),
    ({"prompt": "p", "completion": "x", "label": 9, "labeler": "ai:judge"}, "field 'label': expected a number from 1 to 7, got 9.0"),
    ({"prompt": "p", "chosen": "x"}, "field 'rejected'"),
])
def test_a_bad_ai_record_is_named_by_file_line_and_field(tmp_path, record, where):
    path = write(tmp_path / "ai.jsonl", [pair(9, "a", "ai:judge"), record])
    with pytest.raises(DataError) as error:
        load(path, ai=True)
    assert str(error.value).startswith(f"{path}:2: ") and where in str(error.value)


def test_the_command_prints_the_table_writes_json_and_refuses_bad_files(tmp_path):
    ai, human = write(tmp_path / "ai.jsonl", AI), write(tmp_path / "human.jsonl", HUMANS)
    out = tmp_path / "agreement.json"
    command = [sys.executable, "-m", "rlhf", "judge-agreement", "--ai", str(ai), "--human", str(human)]
    result = subprocess.run([*command, "--json", str(out)], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "overall        4        62%  0.400  0.057" in result.stdout  # 5/8, 0.4, 4/70: see the first test
    assert "[0.6, 0.7)      1        50%" in result.stdout
    saved = json.loads(out.read_text())
    assert saved["ai"] == str(ai) and saved["human"] == str(human)
    assert saved["reports"][0]["rows"][0]["kappa"] == pytest.approx(0.4)

    (tmp_path / "bad.jsonl").write_text(json.dumps(pair(1, "a", "alice")) + "\n{not json\n")
    bad = subprocess.run([*command[:-1], str(tmp_path / "bad.jsonl")], cwd=ROOT, capture_output=True, text=True)
    assert bad.returncode == 2 and bad.stderr.startswith(f"error: {tmp_path / 'bad.jsonl'}:2: not valid JSON"), bad.stderr
    missing = subprocess.run([*command[:5], str(tmp_path / "none.jsonl"), *command[6:]], cwd=ROOT, capture_output=True, text=True)
    assert missing.returncode == 2 and f"error: {tmp_path / 'none.jsonl'}: file not found" in missing.stderr
