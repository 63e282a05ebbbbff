"""Malformed input stops with an error naming file, line and field; valid formats load."""

from __future__ import annotations

import json

import pytest

from rlhf.data import DataError, load_candidates, load_demonstrations, load_feedback, load_prompts
from rlhf.encoding import encode_completion, encode_prompt
from rlhf.models import load_tokenizer

GOOD_PAIR = {"prompt": "Hi?", "chosen": "Hello.", "rejected": "Go away."}
USER = {"role": "user", "content": "Hi?"}


def said(text: str, role: str = "assistant") -> list[dict]:
    return [{"role": role, "content": text}]


def lines(*records) -> bytes:
    return b"".join((r if isinstance(r, bytes) else json.dumps(r).encode()) + b"\n" for r in records)


MALFORMED = [
    # (name, file content, loader, line, field, words in the message)
    ("bad json", lines(GOOD_PAIR, b'{"prompt": "a", "chosen": '), load_feedback, 2, None, "not valid JSON"),
    ("missing field", lines(GOOD_PAIR, {"prompt": "a", "rejected": "b"}), load_feedback, 2, "chosen", "missing"),
    ("empty field", lines({"prompt": "  ", "chosen": "a", "rejected": "b"}), load_feedback, 1, "prompt", "empty"),
    ("wrong type", lines(GOOD_PAIR, GOOD_PAIR, {"prompt": "a", "chosen": "b", "rejected": 3}), load_feedback, 3, "rejected", "expected a string"),
    ("short ranking", lines({"prompt": "a", "completions": ["only one"]}), load_feedback, 1, "completions", "at least 2"),
    ("duplicated ranking", lines({"prompt": "a", "completions": ["x", "y", "x"]}), load_feedback, 1, "completions[2]", "duplicates completions[0]"),
    ("chosen equals rejected", lines({"prompt": "a", "chosen": "same", "rejected": "same"}), load_feedback, 1, "rejected", "same text"),
    ("non-utf8", lines(GOOD_PAIR, b'{"prompt": "caf\xe9", "chosen": "a", "rejected": "b"}'), load_feedback, 2, None, "UTF-8"),
    ("margin not a number", lines({**GOOD_PAIR, "margin": "big"}), load_feedback, 1, "margin", "expected a number"),
    ("record not an object", lines(GOOD_PAIR, ["a", "b"]), load_feedback, 2, None, "expected a JSON object"),
    ("rating label missing", lines({"prompt": "a", "completion": "b"}), load_feedback, 1, "label", "missing"),
    ("ranking entry not text", lines({"prompt": "a", "completions": ["x", 7]}), load_feedback, 1, "completions[1]", "non-empty string"),
    ("completion missing", lines({"prompt": "a"}), load_demonstrations, 1, "completion", "missing"),
    ("bad message role", lines({"messages": [{"role": "robot", "content": "x"}]}), load_demonstrations, 1, "messages[0].role", "unknown role"),
    ("conversation ends with user", lines({"messages": [{"role": "user", "content": "x"}]}), load_demonstrations, 1, "messages", "last message"),
    ("prompt not text", lines({"prompt": ["a"]}), load_prompts, 1, "prompt", "expected a string"),
    ("candidates not a list", lines({"prompt": "a", "candidates": "x"}), load_candidates, 1, "candidates", "non-empty list"),
    ("messages after a string prompt", lines({"prompt": "a", "chosen": said("x"), "rejected": "y"}), load_feedback, 1, "chosen", "needs a conversational prompt"),
    ("completion opens with the user", lines({"prompt": [USER], "completion": said("x", "user")}), load_demonstrations, 1, "completion[0].role", "starts with the assistant"),
    ("implicit prompt: nothing shared", lines({"chosen": [USER, *said("a")], "rejected": said("b", "user") + said("c")}), load_feedback, 1, "rejected", "the prompt is the messages they share"),
    ("implicit prompt: then a user turn", lines({"chosen": [USER, *said("a"), *said("more", "user")], "rejected": [USER, *said("a"), *said("less", "user")]}), load_feedback, 1, "chosen[2].role", "followed by a user turn"),
    ("implicit prompt: the same conversation", lines({"chosen": [USER, *said("a")], "rejected": [USER, *said("a")]}), load_feedback, 1, "rejected", "the same conversation"),
    ("string pair without a prompt", lines({"chosen": "a", "rejected": "b"}), load_feedback, 1, "prompt", "implicit only when they are whole conversations"),
    ("message list in a prompt file", lines({"messages": [USER]}), load_prompts, 1, "prompt", "is a demonstration for SFT"),
    ("sharegpt speaker", lines({"conversations": [{"from": "bot", "value": "x"}]}), load_demonstrations, 1, "conversations[0].from", "unknown speaker"),
    ("prompt message without content", lines({"prompt": [{"role": "user"}]}), load_prompts, 1, "prompt[0].content", "missing"),
]


@pytest.mark.parametrize("name,content,loader,line,field,words", MALFORMED, ids=[m[0] for m in MALFORMED])
def test_malformed_record_names_file_line_and_field(tmp_path, name, content, loader, line, field, words):
    path = tmp_path / "input.jsonl"
    path.write_bytes(content)
    with pytest.raises(DataError) as info:
        loader(path)
    message = str(info.value)
    assert message.startswith(f"{path}:{line}: ")
    if field:
        assert f"field '{field}'" in message
    assert words in message


def test_json_array_reports_the_line_of_the_bad_record(tmp_path):
    path = tmp_path / "prefs.json"
    path.write_text('[\n  {"prompt": "a", "chosen": "b", "rejected": "c"},\n  {"prompt": "a", "chosen": "b"}\n]\n')
    with pytest.raises(DataError, match=rf"^{path}:3: field 'rejected': missing"):
        load_feedback(path)


def test_csv_reports_the_line_and_reads_rankings(tmp_path):
    path = tmp_path / "prefs.csv"
    path.write_text('prompt,completions\nq,"[""a"", ""b"", ""c""]"\nq2,"[""a""]"\n')
    with pytest.raises(DataError, match=rf"^{path}:3: field 'completions': a ranking needs at least 2"):
        load_feedback(path)
    path.write_text('prompt,completions\nq,"[""a"", ""b"", ""c""]"\n')
    (ranking,) = load_feedback(path)
    assert ranking.completions == ["a", "b", "c"] and ranking.ranking


def test_parquet_loads(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "prompts.parquet"
    pq.write_table(pa.table({"prompt": ["one?", "two?"]}), path)
    assert [p.prompt for p in load_prompts(path)] == ["one?", "two?"]


def test_skip_invalid_counts_what_it_skipped(tmp_path):
    path = tmp_path / "prefs.jsonl"
    path.write_bytes(lines(GOOD_PAIR, {"prompt": "a"}, b"{oops", GOOD_PAIR))
    records = load_feedback(path, skip_invalid=True)
    assert len(records) == 2 and records.skipped == 2
    assert f"{path}:2" in records.first_error


def test_formats_are_told_apart_by_their_fields(tmp_path):
    path = tmp_path / "mixed.jsonl"
    path.write_bytes(
        lines(
            {**GOOD_PAIR, "margin": 1.5, "labeler": "ann"},
            {"prompt": "q", "completions": ["best", "mid", "worst"]},
            {"prompt": "q", "completion": "c", "label": 1},
        )
    )
    pair, ranking, rating = load_feedback(path)
    assert (pair.completions, pair.margin, pair.labeler, pair.ranking) == (["Hello.", "Go away."], 1.5, "ann", False)
    assert ranking.completions == ["best", "mid", "worst"] and ranking.ranking
    assert (rating.completion, rating.label) == ("c", 1.0)


def test_prompt_longer_than_the_model_allows(tiny_model_dir):
    tokenizer = load_tokenizer(str(tiny_model_dir))
    long_prompt = "word " * 100
    with pytest.raises(DataError, match=r"^data.jsonl:7: field 'prompt': \d+ tokens; the model allows at most 64"):
        encode_prompt(tokenizer, long_prompt, 64, "data.jsonl:7")
    prompt_ids = encode_prompt(tokenizer, "User: hi\nAssistant:", 64, "data.jsonl:8")
    with pytest.raises(DataError, match=r"^data.jsonl:8: field 'chosen': prompt \+ completion is \d+ tokens"):
        encode_completion(tokenizer, prompt_ids, long_prompt, 64, "data.jsonl:8", "chosen")


def test_skip_invalid_that_leaves_nothing_stops_the_run(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"prompt": "a"}\n{"prompt": "b"}\n')
    with pytest.raises(DataError, match=rf"^{path}:1: field 'completion': missing; skip_invalid left out all 2 records \(invalid records\), so none is left$"):
        load_demonstrations(str(path), skip_invalid=True)


def test_conversational_records_of_every_kind(tmp_path):
    conversation = [{"role": "system", "content": "Be brief."}, USER]
    path = tmp_path / "feedback.jsonl"
    path.write_bytes(lines(
        {"prompt": conversation, "chosen": said("Hello."), "rejected": said("Go away.")},
        {"prompt": conversation, "completions": [said("Hello."), said("Hi."), said("Go away.")]},
        {"prompt": conversation, "completion": said("Hello."), "label": 1},
        {"prompt": conversation, "chosen": "Hello.", "rejected": "Go away."},  # strings are the assistant's replies
    ))
    pair, ranking, rating, strings = load_feedback(path)
    assert pair.prompt == conversation and pair.completions == [said("Hello."), said("Go away.")]
    assert ranking.completions[2] == said("Go away.") and rating.completion == said("Hello.")
    assert strings.prompt == conversation and strings.completions == ["Hello.", "Go away."]
    path.write_bytes(lines({"prompt": conversation}))
    assert load_prompts(path)[0].prompt == conversation
    path.write_bytes(lines({"prompt": conversation, "completion": said("Hello.")}))
    (demo,) = load_demonstrations(path)
    assert (demo.prompt, demo.completion, demo.messages) == (conversation, said("Hello."), None)
    path.write_bytes(lines({"prompt": conversation, "candidates": [{"completion": "Hello.", "model": "m"}]}))
    assert load_candidates(path)[0].prompt == conversation


def test_an_implicit_prompt_is_what_chosen_and_rejected_share(tmp_path):
    # Anthropic hh-rlhf as TRL ships it: two whole conversations that part at the last reply.
    opening = [USER, *said("Hello! How can I help?"), {"role": "user", "content": "Tell me a joke."}]
    path = tmp_path / "hh.jsonl"
    path.write_bytes(lines({"chosen": opening + said("Why did the chicken..."), "rejected": opening + said("No.")}))
    (pair,) = load_feedback(path)
    assert pair.prompt == opening and pair.completions == [said("Why did the chicken..."), said("No.")]
    # A string prompt beside whole conversations is ignored, as TRL does (ultrafeedback_binarized).
    path.write_bytes(lines({"prompt": "Tell me a joke.", "chosen": opening + said("Ha."), "rejected": opening + said("No.")}))
    assert load_feedback(path)[0].prompt == opening


def test_sharegpt_conversations_are_read_as_messages(tmp_path):
    path = tmp_path / "sharegpt.jsonl"
    turns = [{"from": "system", "value": "Be brief."}, {"from": "human", "value": "Hi?"}, {"from": "gpt", "value": "Hello."}]
    path.write_bytes(lines({"conversations": turns}))
    (demo,) = load_demonstrations(path)
    assert demo.messages == [{"role": "system", "content": "Be brief."}, USER, *said("Hello.")]


def test_the_tool_role_is_accepted(tmp_path):
    path = tmp_path / "tools.jsonl"
    messages = [USER, *said("Looking it up."), {"role": "tool", "content": "42", "name": "lookup"}, *said("It is 42.")]
    path.write_bytes(lines({"messages": messages}))
    assert load_demonstrations(path)[0].messages == messages


def test_save_to_disk_folders(tmp_path):
    import datasets

    # A table gives every message every key; the keys set to None are dropped.
    rows = {"prompt": [[USER], [USER, *said("x"), {"role": "tool", "content": "y", "name": "f"}]]}
    datasets.Dataset.from_dict(rows).save_to_disk(tmp_path / "one")
    assert [p.prompt for p in load_prompts(str(tmp_path / "one"))] == rows["prompt"]
    splits = {"train": {"prompt": ["a?", "b?"]}, "test": {"prompt": ["c?"]}}
    datasets.DatasetDict({k: datasets.Dataset.from_dict(v) for k, v in splits.items()}).save_to_disk(tmp_path / "dict")
    assert [p.prompt for p in load_prompts(str(tmp_path / "dict"))] == ["a?", "b?"]
    (test,) = load_prompts(f"{tmp_path / 'dict'}:test")
    assert (test.prompt, test.source) == ("c?", f"{tmp_path / 'dict'}[test] row 0")
    with pytest.raises(DataError, match=r"no split 'dev'; the folder holds train, test"):
        load_prompts(f"{tmp_path / 'dict'}:dev")
    (tmp_path / "plain").mkdir()
    with pytest.raises(DataError, match=r"unsupported file type.*save_to_disk"):
        load_prompts(str(tmp_path / "plain"))


@pytest.mark.parametrize("source,call", [
    ("org/prefs", ("org/prefs", None, "train")),
    ("org/prefs:test", ("org/prefs", None, "test")),
    ("org/prefs:helpful:test", ("org/prefs", "helpful", "test")),
])
def test_hub_names_reach_load_dataset(monkeypatch, source, call):
    import datasets

    calls = []

    def load_dataset(name, config=None, split=None):
        calls.append((name, config, split))
        return [GOOD_PAIR]

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    (pair,) = load_feedback(source)
    assert calls == [call] and pair.completions == ["Hello.", "Go away."]
    assert pair.source.endswith(f"[{call[2]}] row 0")
