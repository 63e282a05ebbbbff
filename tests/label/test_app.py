"""The labeling app over HTTP (in process): sessions, CSRF, validation, exactly-once answers, undo,
overlap, export and the admin page's agreement figures."""

from __future__ import annotations

import re
from html.parser import HTMLParser

import pytest

from rlhf.data import Comparison, Rating, load_feedback
from rlhf.label.db import Store
from rlhf.label.export import export

from .conftest import Labeler, invite, make_project

PAIRS = [(f"Prompt {i}", [f"first answer {i}", f"second answer {i}"]) for i in range(4)]


@pytest.fixture
def pair_db(tmp_path):
    return make_project(tmp_path, "pair", PAIRS, overlap=2)


# ---------------------------------------------------------------- sessions and CSRF


def test_every_page_but_login_needs_a_session(pair_db, client_for):
    client = client_for(pair_db)
    assert client.get("/login").status_code == 200
    for path in ["/", "/label", "/answers", "/admin", "/admin/items/1"]:
        r = client.get(path, follow_redirects=False)
        assert r.status_code == 401, path
        assert "Sign in" in r.json()["error"]
    for path in ["/items/1/answer", "/answers/1/undo", "/logout"]:
        r = client.post(path, data={"csrf": "x", "key": "abcdefgh1", "choice": "a"}, follow_redirects=False)
        assert r.status_code == 401, path
    # A made-up session cookie is no session.
    client.cookies.set("rlhf_label_session", "forged")
    assert client.get("/label").status_code == 401


def test_browsers_get_an_html_error_page(pair_db, client_for):
    r = client_for(pair_db).get("/label", headers={"accept": "text/html"})
    assert r.status_code == 401
    assert r.headers["content-type"].startswith("text/html")
    assert "Sign in first" in r.text


def test_an_invite_works_once(pair_db, client_for):
    token = invite(pair_db, "alice")
    Labeler(client_for(pair_db), token)
    again = client_for(pair_db).post("/login", data={"token": token}, follow_redirects=False)
    assert again.status_code == 403
    assert "not valid or was already used" in again.text
    assert client_for(pair_db).get(f"/login?token={token}").status_code == 403
    assert client_for(pair_db).post("/login", data={"token": "nonsense"}).status_code == 403


def test_a_new_sign_in_link_lets_a_signed_out_labeler_back_in(pair_db, client_for):
    alice = Labeler(client_for(pair_db), invite(pair_db, "alice"))
    first = alice.item_id
    assert alice.client.post("/logout", data={"csrf": alice.csrf}, follow_redirects=False).status_code == 303
    assert alice.client.get("/label").status_code == 401
    admin = Labeler(client_for(pair_db), invite(pair_db, "dana", admin=True))
    page = admin.client.post("/admin/labelers/link", data={"csrf": admin.csrf, "name": "alice"}).text
    link = re.search(r'value="(http://testserver/login\?token=[\w-]+)"', page).group(1)
    again = Labeler(alice.client, link.split("=", 1)[1])
    assert again.item_id == first  # the item handed to her before is still hers
    # A labeler cannot make links.
    r = again.client.post("/admin/labelers/link", data={"csrf": again.csrf, "name": "alice"})
    assert r.status_code == 403


def test_revoke_ends_every_session_at_once(pair_db, client_for):
    token = invite(pair_db, "alice")
    laptop = Labeler(client_for(pair_db), token)
    phone = Labeler(client_for(pair_db), invite(pair_db, "alice"))  # a second link, a second device
    admin = Labeler(client_for(pair_db), invite(pair_db, "dana", admin=True))
    r = admin.client.post("/admin/labelers/revoke", data={"csrf": admin.csrf, "name": "alice"})
    assert r.status_code == 200 and "2 sessions ended" in r.text
    for device in (laptop, phone):
        assert device.client.get("/label").status_code == 401
        assert device.answer({"choice": "a"}).status_code == 401
    assert admin.client.post("/admin/labelers/revoke", data={"csrf": "forged", "name": "bob"}).status_code == 403
    r = admin.client.post("/admin/labelers/revoke", data={"csrf": admin.csrf, "name": "nobody"})
    assert r.status_code == 404
    r = admin.client.post("/admin/labelers/revoke", data={"csrf": admin.csrf, "name": "dana"})
    assert r.status_code == 409  # not oneself
    # A new link restores access.
    Labeler(client_for(pair_db), invite(pair_db, "alice"))


def test_sign_in_links_expire_and_sessions_renew_while_used(pair_db, client_for, monkeypatch):
    import sqlite3
    import time as clock

    from rlhf.label import db as label_db

    token = invite(pair_db, "alice")
    with sqlite3.connect(pair_db) as conn:
        conn.execute("UPDATE labelers SET invite_expires_at = ?", (clock.time() - 1,))
    client = client_for(pair_db)
    for r in [client.get(f"/login?token={token}"), client.post("/login", data={"token": token})]:
        assert r.status_code == 403 and "has expired" in r.text
    # A session unused for SESSION_SECONDS ends; each use pushes the end back.
    alice = Labeler(client, invite(pair_db, "alice"))
    now = clock.time()
    monkeypatch.setattr(label_db.time, "time", lambda: now + label_db.SESSION_SECONDS - 10)
    assert client.get("/label").status_code == 200  # renewed here ...
    monkeypatch.setattr(label_db.time, "time", lambda: now + label_db.SESSION_SECONDS + 10)
    assert client.get("/label").status_code == 200  # ... so still open after the first end
    monkeypatch.setattr(label_db.time, "time", lambda: now + 3 * label_db.SESSION_SECONDS)
    assert client.get("/label").status_code == 401


def test_a_used_link_opened_while_signed_in_opens_the_queue(pair_db, client_for):
    token = invite(pair_db, "alice")
    alice = Labeler(client_for(pair_db), token)
    r = alice.client.get(f"/login?token={token}", follow_redirects=False)
    assert r.status_code == 303 and r.headers["location"] == "/label"


def test_an_admin_signing_in_lands_on_the_overview_and_takes_no_item(pair_db, client_for):
    client = client_for(pair_db)
    r = client.post("/login", data={"token": invite(pair_db, "dana", admin=True)}, follow_redirects=False)
    assert r.headers["location"] == "/admin"
    assert client.get("/admin").status_code == 200
    import sqlite3

    with sqlite3.connect(pair_db) as conn:
        assert conn.execute("SELECT COUNT(*) FROM assignments").fetchone()[0] == 0


def test_session_cookie_is_http_only_and_lax(pair_db, client_for):
    r = client_for(pair_db).post("/login", data={"token": invite(pair_db, "alice")}, follow_redirects=False)
    cookie = r.headers["set-cookie"].lower()
    assert "httponly" in cookie and "samesite=lax" in cookie


def test_forged_or_missing_csrf_token_is_refused(pair_db, client_for):
    alice = Labeler(client_for(pair_db), invite(pair_db, "alice"))
    key = "same-key-123"
    for csrf in ["", "forged-token", alice.csrf[:-1] + ("A" if alice.csrf[-1] != "A" else "B")]:
        r = alice.client.post(
            f"/items/{alice.item_id}/answer", data={"csrf": csrf, "key": key, "choice": "a"}, follow_redirects=False
        )
        assert r.status_code == 403, csrf
        assert "security token" in r.json()["error"]
    # Another labeler's valid token is forged for this session.
    bob = Labeler(client_for(pair_db), invite(pair_db, "bob"))
    r = alice.answer({"choice": "a", "csrf": bob.csrf})
    assert r.status_code == 403
    assert Store(pair_db).live_answers() == []
    # A cross-site form post is refused even with the right token.
    r = alice.answer({"choice": "a"}, headers={"origin": "https://evil.example"})
    assert r.status_code == 403
    # Logging out needs the token too.
    assert alice.client.post("/logout", data={"csrf": "forged"}).status_code == 403
    assert Store(pair_db).live_answers() == []


def test_a_labeler_sees_and_changes_only_their_own_answers(pair_db, client_for):
    alice = Labeler(client_for(pair_db), invite(pair_db, "alice"))
    bob = Labeler(client_for(pair_db), invite(pair_db, "bob"))
    alice_item = alice.item_id
    alice.prefer(0, reason="a private reason of alice")
    (answer,) = Store(pair_db).live_answers()
    # Bob cannot undo Alice's answer, answer an item that was not handed to him, or read her answers.
    r = bob.client.post(f"/answers/{answer.id}/undo", data={"csrf": bob.csrf}, follow_redirects=False)
    assert r.status_code == 404
    assert Store(pair_db).live_answers()[0].id == answer.id
    other = next(i for i in Store(pair_db).items() if i not in (bob.item_id,))
    r = bob.client.post(f"/items/{other}/answer", data={"csrf": bob.csrf, "key": "bob-key-0001", "choice": "a"})
    assert r.status_code == 404
    assert "a private reason of alice" not in bob.client.get("/answers").text
    assert "a private reason of alice" in alice.client.get("/answers").text
    # ... and the admin page is for admins only.
    assert bob.client.get("/admin").status_code == 403
    assert bob.client.get(f"/admin/items/{alice_item}").status_code == 403
    admin = Labeler(client_for(pair_db), invite(pair_db, "carol", admin=True))
    assert admin.client.get("/admin").status_code == 200


def test_logout_ends_the_session(pair_db, client_for):
    alice = Labeler(client_for(pair_db), invite(pair_db, "alice"))
    cookie = alice.client.cookies.get("rlhf_label_session")
    assert alice.client.post("/logout", data={"csrf": alice.csrf}, follow_redirects=False).status_code == 303
    other = client_for(pair_db)
    other.cookies.set("rlhf_label_session", cookie)
    assert other.get("/label").status_code == 401


# ---------------------------------------------------------------- validation


def test_bad_input_gets_a_clear_4xx(pair_db, client_for):
    alice = Labeler(client_for(pair_db), invite(pair_db, "alice"))
    cases = [
        ({"choice": "maybe"}, 422, "choice must be one of a, b, tie, skip"),
        ({"choice": "a", "key": "short"}, 422, "idempotency key"),
        ({"choice": "a", "key": "bad key with spaces"}, 422, "idempotency key"),
        ({"choice": "a", "reason": "x" * 2001}, 422, "reason must be at most 2000"),
    ]
    for data, status, message in cases:
        r = alice.answer(data, key=data.pop("key", None))
        assert r.status_code == status, data
        assert message in r.json()["error"]
    r = alice.client.post(f"/items/{alice.item_id}/answer", json={"csrf": alice.csrf, "choice": "a"})
    assert r.status_code == 415
    r = alice.client.post("/items/999/answer", data={"csrf": alice.csrf, "key": "abcdefgh1", "choice": "a"})
    assert r.status_code == 404
    r = alice.client.post("/items/abc/answer", data={"csrf": alice.csrf})
    assert r.status_code == 404
    r = alice.answer({"choice": "a", "reason": "x" * 70_000})
    assert r.status_code == 413
    assert Store(pair_db).live_answers() == []


def test_bad_ids_and_numbers_get_a_4xx(tmp_path, client_for):
    """Ids past SQLite's 64-bit integers, and digits other than ASCII ones, are refused, never a 500."""
    db = make_project(tmp_path, "rank", [("p", ["x", "y", "z"])])
    alice = Labeler(client_for(db), invite(db, "alice", admin=True))
    huge = str(2**63)
    form = {"csrf": alice.csrf, "key": "abcdefgh1", "choice": "a"}
    for path in [f"/items/{huge}/answer", f"/answers/{huge}/undo", f"/items/{'9' * 30}/answer"]:
        r = alice.client.post(path, data=form)
        assert r.status_code == 404, path
    assert alice.client.get(f"/admin/items/{huge}").status_code == 404
    assert alice.client.get(f"/admin/items/{2**63 - 1}").status_code == 404  # the largest id: not there
    for digit in ["\u00b2", "\u0661", "\uff11"]:  # superscript two, Arabic-Indic one, fullwidth one
        r = alice.answer({"choice": "rank", "rank_0": digit, "rank_1": "2", "rank_2": "3"})
        assert r.status_code == 422 and "whole number from 1 to 3" in r.json()["error"], digit
    r = alice.client.post(f"/items/{alice.item_id}/answer", content=b"choice=a",
                          headers={"content-type": "application/x-www-form-urlencoded", "content-length": "\u00b2".encode("latin-1")})
    assert r.status_code == 413
    assert Store(db).live_answers() == []


def test_rank_and_rate_validation(tmp_path, client_for):
    rank_db = make_project(tmp_path, "rank", [("p", ["x", "y", "z"])], name="rank")
    alice = Labeler(client_for(rank_db), invite(rank_db, "alice"))
    for ranks, message in [((1, 1, 2), "different rank"), ((1, 2, 4), "from 1 to 3"), ((1, 2, ""), "rank_2")]:
        r = alice.answer({f"rank_{i}": str(v) for i, v in enumerate(ranks)} | {"choice": "rank"})
        assert r.status_code == 422 and message in r.json()["error"]
    rate_db = make_project(tmp_path, "rate", [("p", ["x"])], scale="1-7", name="rate")
    bob = Labeler(client_for(rate_db), invite(rate_db, "bob"))
    for choice in ["0", "8", "up", "3.5"]:
        r = bob.answer({"choice": choice})
        assert r.status_code == 422 and "from 1 to 7" in r.json()["error"]


# ---------------------------------------------------------------- exactly once, undo, overlap


def test_the_same_request_twice_stores_one_answer(pair_db, client_for):
    alice = Labeler(client_for(pair_db), invite(pair_db, "alice"))
    key = "retry-key-0001"
    first = alice.answer({"choice": "a"}, key=key)
    second = alice.answer({"choice": "a"}, key=key)
    assert first.status_code == second.status_code == 303
    assert len(Store(pair_db).live_answers()) == 1
    # The same key for a different answer is a client bug: refused, nothing changes.
    r = alice.answer({"choice": "b"}, key=key)
    assert r.status_code == 409 and "idempotency key" in r.json()["error"]
    # A new key for an item already answered (a reloaded page) is refused too.
    r = alice.answer({"choice": "b"}, key="another-key-01")
    assert r.status_code == 409 and "already answered" in r.json()["error"]
    assert len(Store(pair_db).live_answers()) == 1


def test_undo_brings_the_item_back_and_repeats_are_harmless(pair_db, client_for):
    alice = Labeler(client_for(pair_db), invite(pair_db, "alice"))
    first_item = alice.item_id
    alice.prefer(0)
    second_item = alice.item_id
    alice.prefer(1)
    last = Store(pair_db).live_answers()[-1]
    # Only the last answer can be undone.
    first = Store(pair_db).live_answers()[0]
    r = alice.client.post(f"/answers/{first.id}/undo", data={"csrf": alice.csrf}, follow_redirects=False)
    assert r.status_code == 409
    for _ in range(2):  # the second request is a repeat and takes nothing else back
        r = alice.client.post(f"/answers/{last.id}/undo", data={"csrf": alice.csrf}, follow_redirects=False)
        assert r.status_code == 303
    assert [a.item_id for a in Store(pair_db).live_answers()] == [first_item]
    alice.open()
    assert alice.item_id == second_item
    assert "Answer undone" not in alice.page  # the notice shows only right after the redirect
    alice.prefer("tie")
    assert [a.value for a in Store(pair_db).live_answers()] == [0, "tie"]


def test_each_item_goes_to_overlap_different_labelers(tmp_path, client_for):
    db = make_project(tmp_path, "pair", PAIRS, overlap=2)
    labelers = [Labeler(client_for(db), invite(db, name)) for name in ["a", "b", "c"]]
    # Each labeler answers until nothing is left for them.
    for labeler in labelers:
        while "Nothing left for you" not in labeler.page:
            labeler.prefer(0)
    answers = Store(db).live_answers()
    by_item = {}
    for a in answers:
        by_item.setdefault(a.item_id, []).append(a.labeler)
    assert len(answers) == 4 * 2
    assert all(len(names) == len(set(names)) == 2 for names in by_item.values())


def test_skipped_items_go_to_someone_else(tmp_path, client_for):
    db = make_project(tmp_path, "pair", PAIRS[:1], overlap=1)
    alice = Labeler(client_for(db), invite(db, "alice"))
    alice.prefer("skip")
    assert "Nothing left for you" in alice.page
    bob = Labeler(client_for(db), invite(db, "bob"))
    bob.prefer(1)
    assert "Nothing left for you" in bob.page


# ---------------------------------------------------------------- pages


class Tags(HTMLParser):
    """The scripts, event-handler attributes and javascript: links of a page, as a browser parses it."""

    def __init__(self):
        super().__init__()
        self.scripts, self.handlers, self.links_to_javascript = [], [], []

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "script":
            self.scripts.append(attrs.get("src"))
        self.handlers += [name for name in attrs if name.startswith("on")]
        self.links_to_javascript += [v for v in attrs.values() if v and v.strip().lower().startswith("javascript:")]


def test_pages_escape_untrusted_text_and_send_a_csp(tmp_path, client_for):
    evil = '<script>alert(1)</script><img src=x onerror="alert(2)">'
    db = make_project(tmp_path, "pair", [(evil, [evil + " a", '<a href="javascript:alert(3)">x</a>'])])
    alice = Labeler(client_for(db), invite(db, "alice', <b>"))
    page = alice.open()
    assert "<script>alert" not in page.text and "<img src=x" not in page.text and '<a href="javascript' not in page.text
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page.text
    assert "alice&#39;, &lt;b&gt;" in page.text
    csp = page.headers["content-security-policy"]
    assert "script-src 'self'" in csp and "default-src 'none'" in csp and "unsafe-inline" not in csp
    assert page.headers["x-content-type-options"] == "nosniff"
    tags = Tags()
    tags.feed(page.text)
    assert tags.scripts == ["/static/label.js"]  # the only script is the static file
    assert tags.handlers == [] and tags.links_to_javascript == []


def test_keyboard_shortcuts_are_shown(tmp_path, client_for):
    pages = {
        "pair": (PAIRS, ["<kbd>A</kbd>", "<kbd>B</kbd>", "<kbd>T</kbd>"]),
        "rank": ([("p", ["x", "y", "z"])], ["<kbd>1</kbd>", "<kbd>Enter</kbd>"]),
        "rate": ([("p", ["x"])], ["<kbd>Y</kbd>", "<kbd>N</kbd>"]),
    }
    for task, (records, keys) in pages.items():
        db = make_project(tmp_path, task, records, name=task)
        page = Labeler(client_for(db), invite(db, "alice")).page
        for key in keys + ["<kbd>S</kbd>", "<kbd>R</kbd>"]:
            assert key in page, (task, key)


# ---------------------------------------------------------------- export


def test_export_writes_what_load_feedback_reads(tmp_path, client_for):
    pair_db = make_project(tmp_path, "pair", PAIRS[:3], name="pairs")
    alice = Labeler(client_for(pair_db), invite(pair_db, "alice"))
    alice.prefer(1, reason="more precise")
    alice.prefer("tie")
    alice.prefer("skip")
    rank_db = make_project(tmp_path, "rank", [("rank me", ["x", "y", "z"])], name="ranks")
    bob = Labeler(client_for(rank_db), invite(rank_db, "bob"))
    shown = [int(c) for c in re.findall(r'data-position="\d+" data-candidate="(\d+)"', bob.page)]
    # Bob ranks the completion shown third best, then first, then second.
    r = bob.answer({"choice": "rank", "rank_0": "2", "rank_1": "3", "rank_2": "1"})
    assert r.status_code == 303
    rate_db = make_project(tmp_path, "rate", [("rate me", ["good", "bad"])], scale="1-7", name="rates")
    carol = Labeler(client_for(rate_db), invite(rate_db, "carol"))
    assert carol.answer({"choice": "6"}).status_code == 303

    counts = export(Store(pair_db), tmp_path / "pairs.jsonl")
    assert counts == {"pairs": 1, "ties": 1, "skips": 1}
    export(Store(rank_db), tmp_path / "ranks.jsonl")
    export(Store(rate_db), tmp_path / "rates.jsonl")

    (pair,) = load_feedback(tmp_path / "pairs.jsonl")
    assert isinstance(pair, Comparison)
    assert pair.completions == ["second answer 0", "first answer 0"] and pair.labeler == "alice"
    (ranking,) = load_feedback(tmp_path / "ranks.jsonl")
    assert ranking.completions == [["x", "y", "z"][shown[i]] for i in (2, 0, 1)] and ranking.labeler == "bob"
    (rating,) = load_feedback(tmp_path / "rates.jsonl")
    assert isinstance(rating, Rating) and rating.label == 6 and rating.labeler == "carol"
    raw = (tmp_path / "pairs.jsonl").read_text()
    assert '"reason": "more precise"' in raw
    assert re.search(r'"timestamp": "\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ"', raw)


def test_export_command(tmp_path, client_for):
    from rlhf.label.cli import main

    db = make_project(tmp_path, "rate", [("p", ["x", "y"])], overlap=1)
    alice = Labeler(client_for(db), invite(db, "alice"))
    alice.answer({"choice": "up"})
    alice.open()
    alice.answer({"choice": "down"})
    assert main(["export", "--db", str(db), "--out", str(tmp_path / "out.jsonl")]) == 0
    assert sorted(r.label for r in load_feedback(tmp_path / "out.jsonl")) == [0, 1]


def test_a_conversation_is_shown_as_turns_and_exported_as_conversational_records(tmp_path, client_for):
    evil = '<script>alert(1)</script>'
    conversation = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": f"Hi {evil}"}]
    db = make_project(tmp_path, "pair", [(conversation, ["Hello.", f"Go away {evil}"])])
    alice = Labeler(client_for(db), invite(db, "alice", admin=True))
    page = alice.page
    turns = re.findall(r'<li class="turn" data-role="(\w+)">\s*<span class="role">\w+</span>\s*<div class="text">([^<]*)</div>', page)
    assert turns == [("system", "Be brief."), ("user", "Hi &lt;script&gt;alert(1)&lt;/script&gt;")]
    assert "<script>alert" not in page and "im_start" not in page
    admin = alice.client.get(f"/admin/items/{alice.item_id}", headers={"accept": "text/html"}).text
    assert 'data-role="user"' in admin and "<script>alert" not in admin
    alice.prefer(0)
    assert "system: Be brief. user: Hi &lt;script&gt;" in alice.client.get("/answers").text  # the excerpt

    export(Store(db), tmp_path / "pairs.jsonl")
    (pair,) = load_feedback(tmp_path / "pairs.jsonl")
    assert pair.prompt == conversation
    assert pair.completions == [[{"role": "assistant", "content": "Hello."}], [{"role": "assistant", "content": f"Go away {evil}"}]]


def test_a_project_file_from_before_conversations_still_opens(tmp_path, client_for):
    import sqlite3

    db = make_project(tmp_path, "pair", PAIRS[:1])
    with sqlite3.connect(db) as conn:  # the items table as it was: no messages column
        conn.execute("ALTER TABLE items DROP COLUMN messages")
    alice = Labeler(client_for(db), invite(db, "alice"))
    assert "Prompt 0" in alice.page
    assert Store(db).item(alice.item_id).prompt == "Prompt 0"


# ---------------------------------------------------------------- admin page figures


def stat(html: str, name: str, row: str | None = None) -> str:
    """The text of the cell data-stat=name, inside the row data-pair=row when given."""
    if row is not None:
        html = re.search(rf'<tr data-pair="{re.escape(row)}">(.*?)</tr>', html, re.S).group(1)
    return re.search(rf'data-stat="{name}">([^<]*)<', html).group(1)


def test_admin_agreement_matches_a_hand_computed_example(tmp_path, client_for):
    """Three labelers on four pairs (0/1: which completion is better, T: tie, -: skip):

                item 1  item 2  item 3  item 4
        alice     0       0       1       0
        bob       0       1       1       0
        carol     0       0       T       -

    Krippendorff's alpha (nominal), by the coincidence matrix: o(0,0) = 3 + 1 + 2 = 6 (item 1: six
    ordered 0-0 pairs / (3-1); item 2: two / 2; item 4: two / 1), o(0,1) = o(1,0) = 1 (item 2),
    o(1,1) = 1, o(1,T) = o(T,1) = 1 (item 3). n = 11 values: n_0 = 7, n_1 = 3, n_T = 1.
    D_o = 4 / 11; D_e = 2 (7*3 + 7*1 + 3*1) / (11 * 10) = 62 / 110; alpha = 1 - 40/62 = 11/31 = 0.355.

    Cohen's kappa, alice-bob on items 1-4: p_o = 3/4; alice 0:3/4 1:1/4, bob 0:1/2 1:1/2,
    p_e = 3/8 + 1/8 = 1/2, kappa = (3/4 - 1/2) / (1/2) = 0.5.
    alice-carol on items 1-3 (carol skipped 4): p_o = 2/3, p_e = (2/3)(2/3) = 4/9, kappa = (2/9)/(5/9) = 0.4.
    bob-carol on items 1-3: p_o = 1/3, p_e = (1/3)(2/3) = 2/9, kappa = (1/9)/(7/9) = 1/7 = 0.143.
    Pairs of labelers agreeing: item 1 3 of 3, item 2 1 of 3, item 3 1 of 3, item 4 1 of 1: 6/10 = 60%.
    """
    db = make_project(tmp_path, "pair", PAIRS, overlap=3)
    answers = {"alice": [0, 0, 1, 0], "bob": [0, 1, 1, 0], "carol": [0, 0, "tie", "skip"]}
    items = sorted(Store(db).items())
    for name, values in answers.items():
        labeler = Labeler(client_for(db), invite(db, name))
        for _ in values:
            labeler.prefer(values[items.index(labeler.item_id)])
    admin = Labeler(client_for(db), invite(db, "dana", admin=True))
    html = admin.client.get("/admin").text

    assert stat(html, "alpha") == "0.355"
    assert stat(html, "agreement") == "60%"
    assert stat(html, "kappa", "alice|bob") == "0.500"
    assert stat(html, "kappa", "alice|carol") == "0.400"
    assert stat(html, "kappa", "bob|carol") == "0.143"
    assert stat(html, "shared", "alice|carol") == "3"
    assert stat(html, "agreement", "alice|bob") == "75%"
    disagreements = re.findall(r'<tr data-item="(\d+)">', html)
    assert sorted(int(i) for i in disagreements) == [items[1], items[2]]
    assert stat(html, "complete") == "3"  # item 4 has two answers of three (carol skipped)
    carol_row = re.search(r'<tr data-labeler="carol">(.*?)</tr>', html, re.S).group(1)
    assert stat(carol_row, "skipped") == "1" and stat(carol_row, "ties") == "1"
    # The item page lists every answer with its labeler.
    page = admin.client.get(f"/admin/items/{items[2]}").text
    assert "#1 better" not in page and "#2 better" in page and "tie" in page


def test_forwarded_headers_count_only_from_a_trusted_proxy(pair_db):
    from starlette.testclient import TestClient

    from rlhf.label.app import create_app

    forwarded = {"x-forwarded-proto": "https", "x-forwarded-host": "label.example", "origin": "https://label.example"}
    # The in-process client's address is "testclient".
    with TestClient(create_app(pair_db, frozenset({"testclient"}))) as client:
        r = client.post("/login", data={"token": invite(pair_db, "alice")}, headers=forwarded, follow_redirects=False)
        assert r.status_code == 303 and "secure" in r.headers["set-cookie"].lower()
    with TestClient(create_app(pair_db)) as client:  # anyone could send these headers
        r = client.post("/login", data={"token": invite(pair_db, "bob")}, headers=forwarded, follow_redirects=False)
        assert r.status_code == 403 and "another site" in r.text


def test_completions_render_markdown_and_code(tmp_path, client_for):
    code = "Use a loop:\n\n```python\nfor i in range(3):\n    print('<b>', i)\n```"
    db = make_project(tmp_path, "pair", [("Print <b> three times", [code, "print('<b>' * 3)"])])
    page = Labeler(client_for(db), invite(db, "alice")).page
    assert "<pre><code>for i in range(3):\n    print(&#39;&lt;b&gt;&#39;, i)</code></pre>" in page
    assert "<p>Use a loop:</p>" in page and "<b>" not in page


def test_gold_items_flag_a_careless_labeler(tmp_path, client_for):
    """40 items, each to 3 labelers, and 20 gold pairs mixed in at 30%: a careful labeler gets the
    gold right, a careless one answers at random (about half right), a third always presses A."""
    import json
    import random

    from rlhf.label.cli import main, read_gold

    db = make_project(tmp_path, "pair", [(f"Question {i}", [f"one {i}", f"two {i}"]) for i in range(40)], overlap=3)
    gold_file = tmp_path / "gold.jsonl"
    gold_file.write_text("".join(
        json.dumps({"prompt": f"Gold {i}", "chosen": f"right {i}", "rejected": f"wrong {i}"}) + "\n" for i in range(20)))
    store = Store(db)
    gold = read_gold(gold_file, store.project())
    assert store.add_items([item for item, _ in gold], [answer for _, answer in gold]) == 20
    store.set_setting("gold_rate", "0.3")
    coin = random.Random(0)
    labelers = {name: Labeler(client_for(db), invite(db, name)) for name in ["careful", "careless", "lefty"]}
    shown = {name: [] for name in labelers}
    for name, labeler in labelers.items():
        while "Nothing left for you" not in labeler.page:
            item = store.item(labeler.item_id)
            shown[name].append(item)
            if name == "lefty":
                r = labeler.answer({"choice": "a"})
                assert r.status_code == 303
                labeler.open()
            elif name == "careful" and item.gold is not None:
                labeler.prefer(item.gold)
            else:
                labeler.prefer(coin.choice([0, 1]))
    for name, items in shown.items():
        share = sum(item.gold is not None for item in items) / len(items)
        assert sum(item.gold is None for item in items) == 40 and 0.28 <= share <= 0.32, (name, share)
    gold_seen = sum(item.gold is not None for item in shown["careful"])

    admin = Labeler(client_for(db), invite(db, "dana", admin=True))
    html = admin.client.get("/admin").text
    quality = re.search(r'<table class="table" id="quality">(.*?)</table>', html, re.S).group(1)
    rows = {name: re.search(rf'<tr data-labeler="{name}">(.*?)</tr>', quality, re.S).group(1) for name in labelers}
    assert stat(rows["careful"], "gold-accuracy") == "100%" and stat(rows["careful"], "gold-answered") == str(gold_seen)
    careless = int(stat(rows["careless"], "gold-accuracy").rstrip("%"))
    assert careless < 70 and 'data-stat="flagged"' in rows["careless"]
    assert 'data-stat="flagged"' not in rows["careful"]
    assert stat(rows["lefty"], "first-side") == "100%"
    assert 35 <= int(stat(rows["careful"], "first-side").rstrip("%")) <= 65
    assert re.fullmatch(r"\d+ s", stat(rows["careful"], "seconds"))
    assert 'data-labeler="dana"' not in quality  # an admin who answered nothing is not a labeler here
    gold_ids = {item.id for items in shown.values() for item in items if item.gold is not None}
    assert not gold_ids & {int(i) for i in re.findall(r'<tr data-item="(\d+)">', html)}

    # The export leaves out gold answers, carries each labeler's accuracy, and can drop the careless.
    assert main(["export", "--db", str(db), "--out", str(tmp_path / "all.jsonl")]) == 0
    records = [json.loads(line) for line in (tmp_path / "all.jsonl").read_text().splitlines()]
    assert len(records) == 3 * 40 and not any(r["prompt"].startswith("Gold") for r in records)
    assert {r["labeler"]: r["gold_accuracy"] for r in records}["careful"] == 1.0
    assert main(["export", "--db", str(db), "--out", str(tmp_path / "kept.jsonl"), "--min-gold-accuracy", "0.7"]) == 0
    kept = [json.loads(line) for line in (tmp_path / "kept.jsonl").read_text().splitlines()]
    assert {r["labeler"] for r in kept} == {"careful"} and len(kept) == 40  # pressing A alone fails the gold too


def test_the_admin_item_page_says_what_each_labeler_saw_as_a_and_b(pair_db, client_for):
    alice = Labeler(client_for(pair_db), invite(pair_db, "alice"))
    item, shown_a = alice.item_id, alice.candidate_at("a")
    alice.prefer(shown_a, reason="A is concise")
    admin = Labeler(client_for(pair_db), invite(pair_db, "dana", admin=True))
    page = admin.client.get(f"/admin/items/{item}").text
    row = re.search(r'<tr data-labeler="alice">(.*?)</tr>', page, re.S).group(1)
    assert stat(row, "seen") == f"A = #{shown_a + 1} · B = #{2 - shown_a}"
    assert f"#{shown_a + 1} better" in row and "A is concise" in row


def test_a_late_answer_does_not_pass_the_overlap(tmp_path, client_for, monkeypatch):
    import time as clock

    from rlhf.label import db as label_db

    db = make_project(tmp_path, "pair", PAIRS[:1], overlap=1)
    alice = Labeler(client_for(db), invite(db, "alice"))  # holds the only item, then walks away
    now = clock.time()
    monkeypatch.setattr(label_db.time, "time", lambda: now + label_db.LEASE_SECONDS + 1)
    bob = Labeler(client_for(db), invite(db, "bob"))  # the lease ran out: the item goes to bob
    assert bob.item_id == alice.item_id
    bob.prefer(0)
    r = alice.answer({"choice": "a"})  # alice comes back to her old page
    assert r.status_code == 303 and r.headers["location"] == "/label?done=late"
    assert [a.labeler for a in Store(db).live_answers()] == ["bob"]
    page = alice.client.get("/label?done=late").text
    assert "yours was not needed" in page and "Nothing left for you" in page


def test_the_admin_page_shows_the_reward_model_by_labeler(tmp_path, client_for):
    """A personal reward model's eval.json named at serve time: each labeler's held-out accuracy,
    pooled against their own, and where they part most; a name in it is text, never markup."""
    import json

    evaluation = tmp_path / "eval.json"
    table = {
        "brief": {"held_out": 150, "pairs": 900, "pooled_accuracy": 0.709, "train_labels": 400, "weight": 0.889, "own_accuracy": 0.749,
                  "disagreements": [{"source": "personal_eval.jsonl:12", "pooled_margin": -0.8, "own_margin": 0.5}]},
        "<b>polite</b>": {"held_out": 150, "pairs": 900, "pooled_accuracy": 0.789, "train_labels": 400, "weight": 0.889, "own_accuracy": 0.803,
                          "disagreements": []},
        "gold": {"held_out": 50, "pairs": 50, "pooled_accuracy": 0.9},
    }
    evaluation.write_text(json.dumps({"accuracy": 0.74, "labelers": table}))
    db = make_project(tmp_path, "pair", PAIRS)
    Store(db).set_setting("reward_eval", str(evaluation))
    admin = Labeler(client_for(db), invite(db, "dana", admin=True))
    html = admin.client.get("/admin").text
    rows = re.findall(r'<tr data-labeler="([^"]+)">(.*?)</tr>', html.split('id="reward-labelers"')[1], re.S)
    assert [name for name, _ in rows] == ["brief", "&lt;b&gt;polite&lt;/b&gt;", "gold"]  # most improved by their own score first
    assert (stat(rows[0][1], "pooled-accuracy"), stat(rows[0][1], "own-accuracy")) == ("71%", "75%")
    assert "personal_eval.jsonl:12: -0.80 / +0.50" in rows[0][1]
    assert stat(rows[2][1], "own-accuracy") == "—"  # no score of their own (held-out labels only)
    assert "<b>polite</b>" not in html

    evaluation.write_text("{not json")  # retrained mid-write, or moved: the page says so and shows the rest
    html = admin.client.get("/admin").text
    assert f"cannot read the reward model&#39;s per-labeler evaluation {evaluation}: JSONDecodeError" in html
    assert 'id="agreement"' in html or "Agreement" in html
