"""The `rlhf label` commands: mounting on the main CLI, invites, project settings."""

from __future__ import annotations

import argparse
import re

from rlhf.label.cli import add_label_parser, main, run
from rlhf.label.db import Project, Store

from .conftest import make_project, write_candidates


def test_mounts_on_the_main_cli(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    parser = argparse.ArgumentParser(prog="rlhf")
    add_label_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["label", "export", "--db", "f.sqlite", "--out", "prefs.jsonl"])
    assert args.func.__name__ == "export_command" and str(args.out) == "prefs.jsonl"
    assert run(parser.parse_args(["label", "serve", "--db", "missing.sqlite", "--overlap", "0"])) == 2


def test_add_labeler_prints_a_one_time_link(tmp_path, capsys):
    db = make_project(tmp_path, "pair", [("p", ["x", "y"])])
    assert main(["add-labeler", "alice", "--db", str(db), "--base-url", "https://label.example/"]) == 0
    first = capsys.readouterr().out.strip()
    assert re.fullmatch(r"https://label\.example/login\?token=[\w-]{32}", first)
    token = first.split("=", 1)[1]
    assert Store(db).invited(token)[0].name == "alice"
    # Asking again (a lost link) gives a new invite; the old one stops working.
    assert main(["add-labeler", "alice", "--db", str(db)]) == 0
    second = capsys.readouterr().out.strip().split("=", 1)[1]
    assert Store(db).invited(token)[0] is None and Store(db).invited(second)[0].name == "alice"
    assert main(["add-labeler", " ", "--db", str(db)]) == 2


def test_serve_refuses_to_change_a_project(tmp_path, capsys):
    db = make_project(tmp_path, "rank", [("p", ["x", "y", "z"])], overlap=2)
    candidates = write_candidates(tmp_path / "more.jsonl", [("q", ["a", "b"])])
    for flags in (["--task", "pair"], ["--overlap", "1"], ["--overlap", "0"]):
        assert main(["serve", "--db", str(db), "--candidates", str(candidates), *flags]) == 2
    err = capsys.readouterr().err
    assert "cannot change to task=pair" in err and "cannot change to task=rank, overlap=1" in err
    assert "overlap must be a whole number >= 1" in err
    assert len(Store(db).items()) == 1  # nothing was added


def test_the_overlap_can_be_raised_later(tmp_path, client_for):
    from .conftest import Labeler, invite

    db = make_project(tmp_path, "pair", [("p", ["x", "y"])], overlap=1)
    alice = Labeler(client_for(db), invite(db, "alice"))
    alice.prefer(0)
    bob = Labeler(client_for(db), invite(db, "bob"))
    assert "Nothing left for you" in bob.page  # the item is complete
    assert Store(db).set_project(Project("pair", 2, "thumbs")).overlap == 2  # what `serve --overlap 2` does
    carol = Labeler(client_for(db), invite(db, "carol"))  # a server started on the raised overlap
    assert "Nothing left for you" not in carol.page


def test_serve_reports_a_bad_candidates_file(tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "p", "candidates": "not a list"}\n')
    assert main(["serve", "--db", str(tmp_path / "f.sqlite"), "--candidates", str(bad)]) == 2
    assert "bad.jsonl:1: field 'candidates'" in capsys.readouterr().err
    assert Store(tmp_path / "f.sqlite").project() is None


def test_a_failed_first_serve_leaves_no_project(tmp_path, capsys):
    db = tmp_path / "f.sqlite"
    assert main(["serve", "--db", str(db)]) == 2
    single = write_candidates(tmp_path / "single.jsonl", [("p", ["only one"])])
    assert main(["serve", "--db", str(db), "--candidates", str(single), "--task", "pair"]) == 2
    assert "gives no pair items" in capsys.readouterr().err
    assert not db.exists()  # no empty project file left behind


def test_serve_reads_only_a_local_candidates_file(tmp_path, capsys):
    db = tmp_path / "f.sqlite"
    for source in ["candidates", str(tmp_path / "missing.jsonl")]:  # no suffix: never looked up on the hub
        assert main(["serve", "--db", str(db), "--candidates", source]) == 2
        (line,) = capsys.readouterr().err.strip().splitlines()
        assert line.startswith("error: ") and ("ends in one of .jsonl" in line or "file not found" in line)
    assert not db.exists()


def test_revoke_command(tmp_path, capsys):
    db = make_project(tmp_path, "pair", [("p", ["x", "y"])])
    store = Store(db)
    for _ in range(2):
        session, _ = store.redeem_invite(store.add_labeler("alice")[0])
    assert main(["revoke", "alice", "--db", str(db)]) == 0
    assert "2 sessions ended" in capsys.readouterr().err
    assert store.session(session) is None
    assert main(["revoke", "bob", "--db", str(db)]) == 2
    assert capsys.readouterr().err.strip() == "error: there is no labeler 'bob'"


def test_serve_checks_its_deployment_flags(tmp_path, capsys):
    candidates = write_candidates(tmp_path / "c.jsonl", [("p", ["x", "y"])])
    db = tmp_path / "f.sqlite"
    for flags, message in [(["--root-path", "label"], "--root-path must start with /"),
                           (["--workers", "0"], "--workers must be at least 1")]:
        assert main(["serve", "--db", str(db), "--candidates", str(candidates), *flags]) == 2
        assert capsys.readouterr().err.strip() == f"error: {message}" + (", got 'label'" if "root" in message else ", got 0")
    assert not db.exists()


def test_serve_refuses_unreadable_guidelines(tmp_path, capsys):
    candidates = write_candidates(tmp_path / "c.jsonl", [("p", ["x", "y"])])
    binary = tmp_path / "guidelines.md"
    binary.write_bytes(b"\xff\xfe not utf-8")
    for path in [binary, tmp_path / "missing.md"]:
        assert main(["serve", "--db", str(tmp_path / "f.sqlite"), "--candidates", str(candidates),
                     "--guidelines", str(path)]) == 2
        (line,) = capsys.readouterr().err.strip().splitlines()
        assert line.startswith(f"error: cannot read the guidelines {path}")
    assert not (tmp_path / "f.sqlite").exists()


def test_serve_refuses_gold_that_does_not_fit_the_project(tmp_path, capsys):
    candidates = write_candidates(tmp_path / "c.jsonl", [("p", ["x", "y"])])
    ranking = tmp_path / "gold.jsonl"
    ranking.write_text('{"prompt": "p", "completions": ["a", "b", "c"]}\n')
    db = tmp_path / "f.sqlite"
    for flags, message in [(["--gold", str(ranking)], "not a pair record"),
                           (["--gold-rate", "1.5"], "--gold-rate must be at least 0 and below 1"),
                           (["--gold", str(tmp_path / "gold")], "a gold file ends in one of")]:
        assert main(["serve", "--db", str(db), "--candidates", str(candidates), *flags]) == 2
        (line,) = capsys.readouterr().err.strip().splitlines()
        assert line.startswith("error: ") and message in line, line
    assert not db.exists()


def test_the_same_pair_in_the_other_order_is_one_item(tmp_path):
    db = make_project(tmp_path, "pair", [("p", ["x", "y"]), ("p", ["y", "x"]), ("q", ["x", "y"])])
    assert sorted(item.completions for item in Store(db).items().values()) == [["x", "y"], ["x", "y"]]
    assert Store(db).add_items([("p", ["y", "x"], "again:1")]) == 0


def test_serve_hands_its_flags_to_uvicorn(tmp_path, capsys, monkeypatch):
    import os

    import uvicorn

    calls = []
    monkeypatch.setattr(uvicorn, "run", lambda app, **kwargs: calls.append((app, kwargs)))
    monkeypatch.setattr(os, "environ", dict(os.environ))
    candidates = write_candidates(tmp_path / "c.jsonl", [("p", ["x", "y"])])
    db = tmp_path / "f.sqlite"
    assert main(["serve", "--db", str(db), "--candidates", str(candidates), "--host", "0.0.0.0", "--workers", "2",
                 "--root-path", "/label/", "--trusted-proxy", "10.0.0.5", "--trusted-proxy", "10.0.0.6"]) == 0
    ((app, kwargs),) = calls
    assert app == "rlhf.label.app:app_from_environment" and kwargs["factory"] and kwargs["workers"] == 2
    assert kwargs["root_path"] == "/label" and kwargs["proxy_headers"] is False
    assert os.environ["RLHF_LABEL_DB"] == str(db) and os.environ["RLHF_LABEL_TRUSTED_PROXIES"] == "10.0.0.5,10.0.0.6"
    assert "--base-url https://YOUR-HOST/label" in capsys.readouterr().err  # not http://0.0.0.0


def test_serve_refuses_a_reward_evaluation_without_labelers(tmp_path, capsys):
    candidates = write_candidates(tmp_path / "c.jsonl", [("p", ["x", "y"])])
    plain = tmp_path / "eval.json"
    plain.write_text('{"accuracy": 0.8, "margin": 1.0}')
    for path, message in [(plain, "KeyError: 'labelers'"), (tmp_path / "missing.json", "FileNotFoundError")]:
        assert main(["serve", "--db", str(tmp_path / "f.sqlite"), "--candidates", str(candidates), "--reward-eval", str(path)]) == 2
        (line,) = capsys.readouterr().err.strip().splitlines()
        assert line.startswith(f"error: cannot read the reward model's per-labeler evaluation {path}: {message}")
    assert not (tmp_path / "f.sqlite").exists()
