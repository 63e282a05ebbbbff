"""Malformed input stops with an error naming file, line and field; valid formats load."""

from __future__ import annotations

import json

import pytest

from rlhf.data import DataError, load_candidates, load_demonstrations, load_feedback, load_prompts
from rlhf.encoding import encode_completion, encode_prompt
from rlhf.models import load_tokenizer

GOOD_PAIR = {"prompt": "Hi?", "chosen": "Hello.", "rejected": "Go away."}


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
