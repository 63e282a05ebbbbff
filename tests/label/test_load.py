"""50 labelers submitting 20 answers each at once, every answer posted twice: each stored exactly
once, with one server process and with two sharing the file."""

from __future__ import annotations

import asyncio
import importlib.util
import sqlite3
import sys
from collections import Counter

import pytest

from .conftest import ROOT

spec = importlib.util.spec_from_file_location("label_load", ROOT / "benchmarks" / "label_load.py")
label_load = sys.modules["label_load"] = importlib.util.module_from_spec(spec)
spec.loader.exec_module(label_load)

LABELERS, ANSWERS, OVERLAP = 50, 20, 2


@pytest.mark.parametrize("workers", [1, 2])
def test_concurrent_answers_are_stored_exactly_once(serve, tmp_path, workers):
    db, tokens = label_load.make_project(tmp_path, LABELERS, ANSWERS, OVERLAP)
    server = serve(db, "--workers", str(workers))
    load = asyncio.run(label_load.run_load(server.url, tokens, ANSWERS, repeat=True))
    print("load:", load.summary())

    assert load.errors == []
    assert len(load.acknowledged) == LABELERS * ANSWERS
    conn = sqlite3.connect(db)
    rows = conn.execute("SELECT idempotency_key, labeler_id, item_id FROM answers WHERE undone_at IS NULL").fetchall()
    keys = [key for key, _, _ in rows]
    assert sorted(keys) == sorted(load.acknowledged)  # every acknowledged answer, once, and nothing else
    assert set(Counter(labeler for _, labeler, _ in rows).values()) == {ANSWERS}
    per_item = Counter(item for _, _, item in rows)
    assert len(per_item) == LABELERS * ANSWERS // OVERLAP and set(per_item.values()) == {OVERLAP}
    assert len(set((labeler, item) for _, labeler, item in rows)) == len(rows)  # distinct labelers per item
    assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    conn.close()
