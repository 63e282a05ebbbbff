"""The admin page's table of AI labels against the labelers' answers (`serve --ai-labels FILE`):
the hand-computed figures of tests/test_ai_agreement.py, reached through the app, untrusted
names kept as text, and a bad file refused at serve time and reported on the page later."""

from __future__ import annotations

import json
import re
import subprocess
import sys

from rlhf.label.db import Store

from .conftest import ROOT, Labeler, invite, make_project

# Items 1-4 and 6; completion 0 is "an answer i", completion 1 "the other answer i".
RECORDS = [(f"Question {i}?", [f"an answer {i}", f"the other answer {i}"]) for i in (1, 2, 3, 4, 6)]
ANSWERS = {  # per labeler and item: the better completion, or skip
    "alice": {1: 0, 2: 0, 3: 1, 4: 1, 6: 0},
    "bob": {1: 0, 2: 1, 3: "skip", 4: 1, 6: "skip"},
    "carol": {1: "skip", 2: "skip", 3: "skip", 4: 0, 6: "skip"},
}


def ai_pair(i: int, better: int, confidence: float, principles: dict, labeler: str = "ai:judge") -> dict:
    texts = [f"an answer {i}", f"the other answer {i}"]
    return {"prompt": f"Question {i}?", "chosen": texts[better], "rejected": texts[1 - better], "labeler": labeler,
            "confidence": confidence, "principle": "helpful", "principles": principles, "position_consistent": True}


AI = [
    ai_pair(1, 0, 0.95, {"helpful": 0.9, "harmless": 0.5}),
    ai_pair(2, 0, 0.6, {"helpful": 0.2, "harmless": 0.7}),
    ai_pair(3, 0, 0.55, {"helpful": 0.6, "harmless": 0.3}),
    ai_pair(4, 1, 0.85, {"helpful": 0.8, "harmless": 0.1}),
    ai_pair(5, 0, 0.75, {"helpful": 0.7, "harmless": 0.7}),
]


def cell(html: str, row: str, name: str) -> str:
    """The text of cell data-stat=name in the row with attribute `row` (e.g. data-principle="overall")."""
    found = re.search(rf"<tr {re.escape(row)}>(.*?)</tr>", html, re.S).group(1)
    return re.search(rf'data-stat="{name}">([^<]*)<', found).group(1)


def answered_project(tmp_path, client_for):
    db = make_project(tmp_path, "pair", RECORDS, overlap=3)
    for name, answers in ANSWERS.items():
        labeler = Labeler(client_for(db), invite(db, name))
        while "Nothing left for you" not in labeler.page:
            question = Store(db).item(labeler.item_id).prompt  # "Question i?"
            labeler.prefer(answers[int(question.split()[1].rstrip("?"))])
    return db


def test_the_admin_page_shows_ai_agreement_per_principle_and_confidence(tmp_path, client_for):
    """The example of tests/test_ai_agreement.py (see its first test for the working): overall
    agreement 5/8 (shown to the whole percent, 62%), kappa 0.4, alpha 4/70; helpful 5/8, 0.4,
    1/12; harmless on 3 items 1/2, 0, 1/15. By confidence: [0.6, 0.7) holds item 2 (1 of 2), and
    --min-confidence 0.6 keeps items 1, 2, 4 at 5/7."""
    db = answered_project(tmp_path, client_for)
    labels = tmp_path / "ai.jsonl"
    labels.write_text("".join(json.dumps(r) + "\n" for r in AI))
    Store(db).set_setting("ai_labels", str(labels))
    admin = Labeler(client_for(db), invite(db, "dana", admin=True))
    html = admin.client.get("/admin").text
    section = html.split('id="ai-agreement"')[1].split("</section>")[0]
    assert f"ai:judge <span class=\"muted\">pairs · from {labels}</span>" in section
    figures = {name: [cell(section, f'data-principle="{name}"', s) for s in ("items", "agreement", "kappa", "alpha")]
               for name in ("overall", "helpful", "harmless")}
    assert figures == {"overall": ["4", "62%", "0.400", "0.057"], "helpful": ["4", "62%", "0.400", "0.083"],
                       "harmless": ["3", "50%", "0.000", "0.067"]}
    assert [cell(section, 'data-bucket="0.6"', s) for s in ("items", "agreement", "kept", "kept-agreement")] == ["1", "50%", "3", "71%"]
    assert cell(section, 'data-bucket="0.7"', "agreement") == "—"
    assert "AI labels without a human answer: 1; answered items without an AI label: 1; no verdict under harmless: 1." in section

    # Model output is untrusted text: a labeler or principle name in the file is shown, never run.
    evil = "<img src=x onerror=alert(1)>"
    labels.write_text(json.dumps(ai_pair(1, 0, 0.9, {evil: 0.9}, labeler=f"ai:{evil}")) + "\n")
    html = admin.client.get("/admin").text
    assert evil not in html and "ai:&lt;img src=x onerror=alert(1)&gt;" in html
    assert cell(html, 'data-principle="&lt;img src=x onerror=alert(1)&gt;"', "agreement") == "100%"

    # Rewritten badly while the server runs: the page says where, and shows the rest.
    labels.write_text(json.dumps(AI[0]) + "\n" + json.dumps({**AI[1], "confidence": 2}) + "\n")
    html = admin.client.get("/admin").text
    assert f"{labels}:2: field &#39;confidence&#39;: expected a number from 0 to 1, got 2" in html
    assert 'data-stat="alpha"' in html.split('id="ai-agreement"')[0]  # the labelers' own agreement is still there


def test_without_ai_labels_the_page_has_no_ai_section(tmp_path, client_for):
    db = answered_project(tmp_path, client_for)
    html = Labeler(client_for(db), invite(db, "dana", admin=True)).client.get("/admin").text
    assert 'id="ai-agreement"' not in html


def test_serve_refuses_a_bad_ai_labels_file_before_starting(tmp_path):
    db = make_project(tmp_path, "pair", RECORDS)
    bad = tmp_path / "ai.jsonl"
    bad.write_text(json.dumps(AI[0]) + "\n" + json.dumps({**AI[1], "principles": {"helpful": "yes"}}) + "\n")
    result = subprocess.run([sys.executable, "-m", "rlhf.label", "serve", "--db", str(db), "--ai-labels", str(bad)],
                            cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert f"error: {bad}:2: field 'principles.helpful': expected a number from 0 to 1, got 'yes'" in result.stderr
    assert Store(db).setting("ai_labels", "") == ""


def test_in_a_browser_the_page_shows_what_judge_agreement_prints_for_the_export(browser, serve, tmp_path):
    """A real `serve --ai-labels`, three labelers over HTTP, an admin in Chromium; the figures on
    the page are those `rlhf judge-agreement` gives for the project's export. Screenshots:
    admin-ai-agreement.png and -phone.png."""
    import random

    import httpx

    from .test_browser import shoot, shots_dir, sign_in

    # The better reply comes first by text in four pairs and second in four (kappa's categories).
    questions = ["How do I reset my password?", "Can I change the delivery address after ordering?",
                 "Why was my card charged twice?", "Do you ship to Norway?", "How do I cancel my subscription?",
                 "Where is my refund?", "Can I talk to a real person?", "Is there a student discount?"]
    replies = [("Open Settings, then Security, and choose Reset password; the link arrives within a minute.", "You can just reset it yourself."),
               ("Yes, until it ships: open the order and choose Change address.", "No. That is not possible, what a silly request."),
               ("The second charge is a hold that drops off within 3 days; nothing is taken twice.", "Unclear, banks do that sometimes."),
               ("Yes, to Norway in 4-6 working days; duties are included at checkout.", "We ship to many countries all over the world."),
               ("Go to Account, then Plan, and press Cancel; you keep access until the period ends.", "We cannot help with that here; call us."),
               ("Refunds reach your card 5-10 days after we receive the return; the email has the tracking.", "It is coming."),
               ("Of course: call 555 0100 from 8 am to 8 pm, or choose Chat on the Help page.", "Pretty sure I am a real person. Ask me."),
               ("Yes, 15% with a valid student email; add it under Account, then Discounts.", "Maybe. Check the website.")]
    db = make_project(tmp_path, "pair", list(zip(questions, [list(r) for r in replies])), overlap=3, name="support")
    coin = random.Random(3)
    labels = tmp_path / "ai_prefs.jsonl"
    principles = ["helpful", "harmless", "polite", "concise"]
    with labels.open("w") as f:
        for question, (good, bad) in zip(questions, replies):
            confidence = round(coin.uniform(0.5, 1.0), 4)
            chosen, rejected = (good, bad) if coin.random() < confidence else (bad, good)
            by = {p: round(coin.uniform(0.55, 0.95) if coin.random() < 0.75 else coin.uniform(0.05, 0.45), 4) for p in principles}
            f.write(json.dumps({"prompt": question, "chosen": chosen, "rejected": rejected, "labeler": "ai:Qwen2.5-7B-Instruct",
                                "confidence": confidence, "principle": "helpful", "principles": by, "position_consistent": True}) + "\n")
    server = serve(db, "--ai-labels", str(labels))
    for name, care in [("alice", 0.9), ("bob", 0.8), ("carol", 0.7)]:
        with httpx.Client(base_url=server.url) as client:
            labeler = Labeler(client, Store(db).add_labeler(name)[0])
            while "Nothing left for you" not in labeler.page:
                item = Store(db).item(labeler.item_id)
                good = next(i for i, text in enumerate(item.completions) if any(text == r[0] for r in replies))
                labeler.prefer(good if coin.random() < care else 1 - good)

    export = tmp_path / "export.jsonl"
    for command in (["-m", "rlhf.label", "export", "--db", str(db), "--out", str(export)],
                    ["-m", "rlhf", "judge-agreement", "--ai", str(labels), "--human", str(export), "--json", str(tmp_path / "a.json")]):
        result = subprocess.run([sys.executable, *command], cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert result.returncode == 0, result.stderr
    [report] = json.loads((tmp_path / "a.json").read_text())["reports"]
    assert report["rows"][0]["items"] == len(questions)

    page = sign_in(browser, server, db, "dana", admin=True, lands="/admin")
    table = page.locator('table.ai-principles[data-labeler="ai:Qwen2.5-7B-Instruct"]')
    assert table.is_visible()
    for row in report["rows"]:
        shown = table.locator(f'tr[data-principle="{row["principle"]}"]')
        assert shown.locator('[data-stat="items"]').inner_text() == str(row["items"])
        assert shown.locator('[data-stat="agreement"]').inner_text() == f"{100 * row['agreement']:.0f}%"
        assert shown.locator('[data-stat="alpha"]').inner_text() == ("—" if row["alpha"] is None else f"{row['alpha']:.3f}")
    shoot(page, shots_dir(tmp_path), "admin-ai-agreement")
