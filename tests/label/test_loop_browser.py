"""One round of `rlhf loop` labelled by a person in the labeling app, in real Chromium: the loop
queues the round's items into a running `rlhf label serve`, a labeler ranks them with the
keyboard, and the round goes on to the reward model and PPO with her labels."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

from rlhf.label.db import Project, Store

from .test_browser import press, shots_dir, sign_in

TESTS = Path(__file__).resolve().parents[1]


def test_a_loop_round_waits_for_the_apps_labels_and_trains_on_them(browser, serve, tmp_path, tiny_model_dir, tiny_prompts, tiny_data):
    sys.path.insert(0, str(TESTS))
    from test_loop import loop_recipe

    db = tmp_path / "feedback.sqlite"
    Store(db).set_project(Project("rank", 1, "thumbs"))
    server = serve(db)
    recipe = loop_recipe(tmp_path, tiny_model_dir, tiny_prompts, tiny_data, labeler="")
    overrides = [f"loop.feedback.app_db={db}", "loop.feedback.poll_seconds=0.2", "loop.labels_per_round=[3]", "reward.optim.batch_size=2", "reward.optim.micro_batch_size=2"]
    loop = subprocess.Popen([sys.executable, "-m", "rlhf", "loop", str(recipe), *overrides], cwd=TESTS, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 300
        while len(Store(db).items()) < 3:
            assert loop.poll() is None, loop.communicate()[1][-3000:]
            assert time.time() < deadline, "the loop never queued its items"
            time.sleep(0.2)
        status = subprocess.run([sys.executable, "-m", "rlhf", "loop", "status", str(tmp_path / "runs")], capture_output=True, text=True, cwd=TESTS)
        assert f"round-000: sampled, selected; 0 answered in the app ({db})" in status.stdout, status.stdout

        page = sign_in(browser, server, db, "alice")
        for n in range(3):
            assert page.locator("[data-position]").count() == 3
            page.keyboard.press("2")
            page.keyboard.press("1")  # the third follows: the one left is the worst
            if n == 0:
                page.screenshot(path=str(shots_dir(tmp_path) / "loop-round.png"), full_page=True)
            press(page, "Enter")
        out, err = loop.communicate(timeout=300)
    finally:
        if loop.poll() is None:
            loop.kill()
    assert loop.returncode == 0, err[-3000:]

    rnd = tmp_path / "runs" / "round-000"
    labels = [json.loads(line) for line in (rnd / "feedback.jsonl").read_text().splitlines()]
    assert [label["labeler"] for label in labels] == ["alice"] * 3
    answers = {a.item_id: a.value for a in Store(db).live_answers()}
    items = Store(db).items()
    for label in labels:  # her order, as the app stored it, is the ranking the reward model learns
        (item_id,) = [i for i, item in items.items() if item.source.endswith(f"#{label['item']}")]
        assert label["completions"] == [items[item_id].completions[c] for c in answers[item_id]]
    assert (rnd / "reward" / "model" / "config.json").exists() and (rnd / "ppo" / "model" / "config.json").exists()
    assert "| 0 | 3 (3) |" in (tmp_path / "runs" / "report.md").read_text()
