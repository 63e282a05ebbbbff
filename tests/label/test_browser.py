"""End to end in a real browser: sign in with an invite, answer with the keyboard alone, undo,
export, train a reward model on the export, and check that untrusted text stays inert.

Screenshots of the three task pages and the admin page, at 1280x800 and 390x844, go to $RLHF_SCREENSHOTS when it is set
(docs/screenshots/ holds the committed ones), else to the test's temporary directory.
"""

from __future__ import annotations

import json
import math
import os
import re
import sqlite3
import subprocess
import sys
from pathlib import Path

import httpx

from rlhf.data import Comparison, Rating, load_feedback
from rlhf.label.db import Store

from .conftest import ROOT, Labeler, make_project

PAIR_RECORDS = [
    (
        "Explain in two sentences what a reward model is in RLHF.",
        [
            "A reward model is a network trained on human comparisons to score a response to a prompt. "
            "During PPO its score stands in for the human, so the policy can be optimised against it.",
            "It is the model that gives rewards.",
            "A reward model predicts which of two responses a person would **prefer**; its scalar output is "
            "the reward when the language model is tuned with RL:\n\n"
            "```python\nscore = reward_model(prompt, response)  # one float\nloss = -logsigmoid(chosen - rejected)\n```",
        ],
    ),
    (
        "Write a haiku about autumn rain.",
        [
            "Cold rain on the roof\nmaple leaves drift down the drain\nthe kettle begins",
            "Autumn rain is wet. It falls from the sky in autumn. The end.",
        ],
    ),
    (
        "What does `git rebase -i HEAD~3` do?",
        [
            "It opens an editor listing the last three commits so you can reorder, squash, edit or drop "
            "them; git then replays them on top of HEAD~3.",
            "It deletes your last three commits.",
        ],
    ),
]
RANK_RECORDS = [
    (
        "Suggest a name for a small bakery that specialises in sourdough.",
        ["Rise & Crumb", "Bakery Number One", "**The Slow Loaf**, with a sign in code:\n\n```\nwhile oven.warm(): bake()\n```",
         "Bread Shop"],
    ),
]
RATE_RECORDS = [
    (
        "Summarise: 'The meeting moved from Tuesday to Thursday at 3 pm because the room was booked.'",
        ["The meeting is now on *Thursday at 3 pm*, since the room was taken on Tuesday:\n\n"
         "- before: `Tue 15:00`\n- after: `Thu 15:00`\n\n```\nmeeting.move(\"Tue\", \"Thu\")\n```"],
    ),
]


def shots_dir(tmp_path: Path) -> Path:
    path = Path(os.environ.get("RLHF_SCREENSHOTS") or tmp_path / "screenshots")
    path.mkdir(parents=True, exist_ok=True)
    return path


def cli(*args: str) -> str:
    result = subprocess.run([sys.executable, "-m", "rlhf.label", *args], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


def sign_in(browser, server, db: Path, name: str, admin: bool = False, lands: str = "/label"):
    """A fresh browser context (its own cookies) signed in with an invite from the real CLI."""
    link = cli("add-labeler", name, "--db", str(db), "--base-url", server.url, *(["--admin"] if admin else []))
    assert re.fullmatch(rf"{re.escape(server.url)}/login\?token=[\w-]+", link)
    context = browser.new_context(viewport={"width": 1280, "height": 860})
    page = context.new_page()
    page.goto(link)
    assert "This invite is for" in page.inner_text("main")
    press_sign_in(page)
    page.wait_for_url(f"{server.url}{lands}")
    return page


def press_sign_in(page) -> None:
    """Enter on the login page, once its sign-in button has the focus (`autofocus`: a loaded
    machine may give it the focus a moment after the page's load event)."""
    page.wait_for_function("document.activeElement && document.activeElement.type === 'submit'", timeout=10_000)
    page.keyboard.press("Enter")


def shoot(page, shots: Path, name: str) -> None:
    """A full-page screenshot at a laptop's 1280x800 (name.png) and a phone's 390x844 (name-phone.png)."""
    for suffix, size in [("", {"width": 1280, "height": 800}), ("-phone", {"width": 390, "height": 844})]:
        page.set_viewport_size(size)
        page.screenshot(path=str(shots / f"{name}{suffix}.png"), full_page=True)
        assert page.evaluate("document.documentElement.scrollWidth") <= size["width"], f"{name}{suffix} overflows"
    page.set_viewport_size({"width": 1280, "height": 860})


def press(page, key: str, expect: str = "done=saved") -> None:
    """Press a shortcut that submits, and wait for the next page."""
    with page.expect_navigation(url=re.compile(expect)):
        page.keyboard.press(key)


def item_on(page) -> int:
    return int(re.search(r"/items/(\d+)/answer", page.get_attribute("form.answer", "action")).group(1))


def long_context_model(tiny_model_dir: Path, path: Path) -> Path:
    """The shared tiny GPT-2 with 512 positions instead of 64, so that the page texts fit."""
    from transformers import AutoConfig, AutoTokenizer, GPT2LMHeadModel

    config = AutoConfig.from_pretrained(tiny_model_dir)
    config.n_positions = 512
    GPT2LMHeadModel(config).save_pretrained(path)
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(path)
    return path


def test_label_with_the_keyboard_undo_export_and_train(browser, serve, tmp_path, tiny_model_dir):
    shots = shots_dir(tmp_path)

    # ---- a pair project: three labelers, each item to all three ---------------------------
    pair_db = make_project(tmp_path, "pair", PAIR_RECORDS, overlap=3, name="pairs")
    server = serve(pair_db)
    page = sign_in(browser, server, pair_db, "alice", admin=True, lands="/admin")  # an admin lands on the overview
    page.goto(f"{server.url}/label")
    assert "0</strong> answered" in page.inner_html(".status")

    first = item_on(page)
    shown_a = int(page.get_attribute('[data-side="a"]', "data-candidate"))
    page.keyboard.press("r")
    page.keyboard.type("Response A is precise <b>and</b> short.")
    page.keyboard.press("Escape")
    press(page, "a")
    assert page.inner_text(".notice") == "Answer saved."

    second = item_on(page)
    press(page, "b")
    press(page, "u", expect="done=undone")  # take back the answer to the second item
    assert item_on(page) == second
    assert "Answer undone" in page.inner_text(".notice")
    press(page, "t")  # this time: a tie
    shoot(page, shots, "pair")

    answers = {a.item_id: a for a in Store(pair_db).live_answers()}
    assert answers[first].value == shown_a and answers[first].reason == "Response A is precise <b>and</b> short."
    assert answers[second].value == "tie"
    assert len(answers) == 2

    # Two more labelers answer over plain HTTP, so that the admin page has agreement to show.
    for name, choice in [("bob", "a"), ("carol", "b")]:
        with httpx.Client(base_url=server.url) as client:
            other = Labeler(client, Store(pair_db).add_labeler(name)[0])
            for _ in range(4):
                assert other.answer({"choice": choice}).status_code == 303
                other.open()
    page.goto(f"{server.url}/admin")
    assert page.inner_text('[data-labeler="bob"] [data-stat="answered"]') == "4"
    assert page.inner_text('section.card [data-stat="alpha"]') != ""
    shoot(page, shots, "admin")

    # ---- a ranking ---------------------------------------------------------------------------
    rank_db = make_project(tmp_path, "rank", RANK_RECORDS, name="ranks")
    server = serve(rank_db)
    page = sign_in(browser, server, rank_db, "alice")
    shown = [int(page.get_attribute(f'[data-position="{p}"]', "data-candidate")) for p in range(4)]
    for key in ["3", "1", "4"]:  # the fourth follows: the one left is the worst
        page.keyboard.press(key)
    assert page.inner_text("output.ranking") == "3 > 1 > 4 > 2"
    page.keyboard.press("Backspace")
    page.keyboard.press("Backspace")
    assert page.inner_text("output.ranking") == "3 > 1"
    page.keyboard.press("4")
    assert page.inner_text("output.ranking") == "3 > 1 > 4 > 2"
    shoot(page, shots, "rank")
    press(page, "Enter")
    (ranking,) = Store(rank_db).live_answers()
    assert ranking.value == [shown[2], shown[0], shown[3], shown[1]]

    # ---- a rating on the 1-7 scale ---------------------------------------------------------
    rate_db = make_project(tmp_path, "rate", RATE_RECORDS, scale="1-7", name="ratings")
    server = serve(rate_db)
    page = sign_in(browser, server, rate_db, "alice")
    shoot(page, shots, "rate")
    press(page, "6")
    assert "Nothing left for you" in page.inner_text("main")
    (rating,) = Store(rate_db).live_answers()
    assert rating.value == 6

    # ---- export: files that `load_feedback` (and so `rlhf reward`) reads directly -----------
    out = {}
    for name, db in [("pairs", pair_db), ("ranks", rank_db), ("ratings", rate_db)]:
        out[name] = tmp_path / f"{name}.jsonl"
        cli("export", "--db", str(db), "--out", str(out[name]))
    pairs = load_feedback(out["pairs"])
    assert all(isinstance(r, Comparison) and len(r.completions) == 2 for r in pairs)
    alice_pair = next(r for r in pairs if r.labeler == "alice")  # her tie is left out
    item = Store(pair_db).item(first)
    assert alice_pair.completions == [item.completions[shown_a], item.completions[1 - shown_a]]
    assert len(pairs) == 1 + 4 + 4
    (rank_record,) = load_feedback(out["ranks"])
    assert rank_record.completions == [RANK_RECORDS[0][1][c] for c in ranking.value]
    (rate_record,) = load_feedback(out["ratings"])
    assert isinstance(rate_record, Rating) and rate_record.label == 6

    # ---- a reward model trained on the exported pairs and ranking with `rlhf reward` --------
    model = long_context_model(tiny_model_dir, tmp_path / "base")
    overrides = [
        f"reward.model={model}",
        f"reward.output_dir={tmp_path / 'rm'}",
        f"reward.data.train=[{out['pairs']},{out['ranks']}]",
        "reward.data.eval_fraction=0.2",
        "reward.optim.batch_size=4",
        "reward.optim.micro_batch_size=4",
        "reward.precision=fp32",
    ]
    command = [sys.executable, "-m", "rlhf", "reward", *overrides]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((tmp_path / "rm" / "eval.json").read_text())
    assert metrics["steps"] == 2 and math.isfinite(metrics["margin"])  # 8 of 10 comparisons train, 4 a step
    assert (tmp_path / "rm" / "model" / "config.json").exists()


XSS = {
    "script": "<script>window.__pwned = 'script'</script>",
    "img": "<img src=x onerror=\"window.__pwned = 'img'\">",
    "link": "<a href=\"javascript:window.__pwned = 'link'\">click me</a>",
}


def test_untrusted_text_renders_inert(browser, serve, tmp_path):
    records = [(f"Prompt with {XSS['script']}", [f"{XSS['img']} and {XSS['link']}", f"plain {XSS['script']}"])]
    db = make_project(tmp_path, "pair", records)
    server = serve(db)
    page = sign_in(browser, server, db, f"mallory {XSS['img']}", admin=True, lands="/admin")
    page.goto(f"{server.url}/label")
    dialogs, violations = [], []
    page.on("dialog", lambda d: (dialogs.append(d.message), d.dismiss()))
    page.on("console", lambda m: violations.append(m.text) if "Content Security Policy" in m.text else None)
    page.reload()

    # The text shows literally and makes no elements.
    texts = page.locator(".text").all_inner_texts()
    assert any(XSS["img"] in t and XSS["link"] in t for t in texts)
    assert any(XSS["script"] in t for t in texts)
    assert page.evaluate("document.querySelectorAll('.text *').length") == 0
    assert page.evaluate("document.querySelectorAll('img, a[href^=\"javascript\"]').length") == 0
    assert XSS["img"] in page.inner_text(".who .name")
    page.get_by_text("click me", exact=False).first.click()
    assert page.evaluate("window.__pwned") is None

    # A reason typed by a labeler is untrusted too: the admin's item page shows it as text.
    page.keyboard.press("r")
    page.keyboard.type(XSS["img"])
    page.keyboard.press("Escape")
    press(page, "a")
    page.goto(f"{server.url}/admin/items/1")
    assert XSS["img"] in page.inner_text("main")
    page.goto(f"{server.url}/admin")
    assert page.evaluate("window.__pwned") is None
    assert page.evaluate("document.querySelectorAll('main img').length") == 0
    assert dialogs == [] and violations == []


def test_sign_out_then_in_again_revoke_cross_site_link_and_expired_link(browser, serve, tmp_path):
    db = make_project(tmp_path, "pair", PAIR_RECORDS, overlap=2)
    server = serve(db)

    # Signed out, a labeler comes back with a new link the admin makes on the admin page.
    page = sign_in(browser, server, db, "alice")
    first = item_on(page)
    with page.expect_navigation(url=re.compile("/login$")):
        page.click("text=Sign out")
    page.goto(f"{server.url}/label")
    assert "Sign in first" in page.inner_text("main")
    admin = sign_in(browser, server, db, "dana", admin=True, lands="/admin")
    admin.click('[data-labeler="alice"] [data-action="link"]')
    link = admin.input_value(".link-box")
    assert link.startswith(f"{server.url}/login?token=")
    page.goto(link)
    press_sign_in(page)
    page.wait_for_url(f"{server.url}/label")
    assert item_on(page) == first

    # A link from another site (a chat message) opens the queue signed in: the cookie is Lax.
    page.route("http://chat.example/", lambda route: route.fulfill(
        content_type="text/html", body=f'<a id="go" href="{server.url}/label">next item</a>'))
    page.goto("http://chat.example/")
    with page.expect_navigation(url=f"{server.url}/label"):
        page.click("#go")
    assert item_on(page) == first

    # Revoked, the same browser gets 401 on its next request.
    admin.click('[data-labeler="alice"] [data-action="revoke"]')
    assert "Revoked alice" in admin.inner_text(".notice")
    response = page.reload()
    assert response.status == 401 and "Sign in first" in page.inner_text("main")

    # An expired link is refused with a message that says so.
    link = cli("add-labeler", "erin", "--db", str(db), "--base-url", server.url)
    conn = sqlite3.connect(db)
    with conn:
        conn.execute("UPDATE labelers SET invite_expires_at = 0 WHERE name = 'erin'")
    conn.close()
    response = page.goto(link)
    assert response.status == 403
    assert "This sign-in link has expired: ask your project admin for a new one." in page.inner_text(".error")


def test_rank_twelve_with_the_keyboard_and_read_the_guidelines(browser, serve, tmp_path):
    db = make_project(tmp_path, "rank", [("Count to twelve.", [f"response {n}" for n in range(12)])])
    guidelines = tmp_path / "guidelines.md"
    guidelines.write_text("Rank by **correctness** first.\n\n- Then brevity.")
    server = serve(db, "--guidelines", str(guidelines))
    page = sign_in(browser, server, db, "alice")
    assert "<kbd>1</kbd>–<kbd>12</kbd>" in page.content()
    # The guidelines are one key away, and the same key closes them.
    assert not page.is_visible("#guidelines li")
    page.keyboard.press("g")
    assert page.inner_text("#guidelines strong") == "correctness" and page.is_visible("#guidelines li")
    page.keyboard.press("g")
    assert not page.is_visible("#guidelines li")
    order = ["12", "1", "10", "2", "11", "3", "4", "5", "6", "7", "8"]  # the twelfth pick, 9, follows
    for number in order:
        page.keyboard.type(number)
        if number == "1":
            page.wait_for_timeout(900)  # a lone 1 is taken once no second digit comes
    assert page.inner_text("output.ranking") == " > ".join(order + ["9"])
    shown = [int(page.get_attribute(f'[data-position="{p}"]', "data-candidate")) for p in range(12)]
    press(page, "Enter")
    (ranking,) = Store(db).live_answers()
    assert ranking.value == [shown[int(n) - 1] for n in order + ["9"]]


def test_admin_page_shows_gold_accuracy_per_labeler(browser, serve, tmp_path):
    import random

    db = make_project(tmp_path, "pair", [(f"Question {i}", [f"one {i}", f"two {i}"]) for i in range(12)], overlap=2)
    gold = tmp_path / "gold.jsonl"
    gold.write_text("".join(json.dumps({"prompt": f"Gold {i}", "chosen": f"right {i}", "rejected": f"wrong {i}"}) + "\n"
                            for i in range(10)))
    server = serve(db, "--gold", str(gold), "--gold-rate", "0.3")
    coin = random.Random(1)
    for name in ["careful", "careless"]:
        with httpx.Client(base_url=server.url) as client:
            labeler = Labeler(client, Store(db).add_labeler(name)[0])
            while "Nothing left for you" not in labeler.page:
                item = Store(db).item(labeler.item_id)
                labeler.prefer(item.gold if name == "careful" and item.gold is not None else coin.choice([0, 1]))
    page = sign_in(browser, server, db, "dana", admin=True, lands="/admin")
    assert page.inner_text('#quality [data-labeler="careful"] [data-stat="gold-accuracy"]') == "100%"
    assert page.is_visible('#quality [data-labeler="careless"] [data-stat="flagged"]')
    shoot(page, shots_dir(tmp_path), "admin-quality")
