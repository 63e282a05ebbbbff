"""Record formats that every stage reads, and errors that name the file, the line and the field.

Field names are the ones TRL users already have in their data:

    demonstrations  {"prompt", "completion"}  or  {"messages": [{"role", "content"}, ...]}
    prompts         {"prompt"}
    preferences     {"prompt", "chosen", "rejected", "margin"?, "labeler"?}
    rankings        {"prompt", "completions": [best, ..., worst], "labeler"?}
    ratings         {"prompt", "completion", "label"}   label: 0/1 (thumbs) or a number (a score)
    candidates      {"prompt", "candidates": [{"completion", "model", "sampling": {...}}, ...]}
                    (what `rlhf generate` writes and the labeling app reads)

Sources: a local .jsonl / .json / .csv / .parquet file, or a dataset name on the Hugging Face hub
(`name` or `name:split`, read with `datasets.load_dataset`). Extra fields are ignored; a malformed
record stops the run with a `DataError` unless `skip_invalid` is set, in which case the number
of skipped records is reported.
"""

from __future__ import annotations

import csv
import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, TypeVar

log = logging.getLogger(__name__)

LOCAL_SUFFIXES = (".jsonl", ".json", ".csv", ".parquet")


class DataError(ValueError):
    """A record that cannot be used; the message names file, line (or row) and field."""

    def __init__(self, where: str, message: str, field: str | None = None):
        self.where, self.field, self.reason = where, field, message
        super().__init__(f"{where}: field '{field}': {message}" if field else f"{where}: {message}")


@dataclass
class Demonstration:
    prompt: str
    completion: str
    source: str
    messages: list[dict] | None = None
    """The conversation, when the record came as {"messages": [...]} (prompt/completion are then empty)."""


@dataclass
class Prompt:
    prompt: str
    source: str


@dataclass
class Comparison:
    """A pairwise preference or a ranking: `completions` run best to worst (a pair has two)."""

    prompt: str
    completions: list[str]
    source: str
    margin: float = 0.0
    labeler: str | None = None
    ranking: bool = False
    """True when the record came as a ranking ({"completions": [...]}), False for chosen/rejected."""

    def field_name(self, i: int) -> str:
        """The record field that holds completion `i`, for error messages."""
        return f"completions[{i}]" if self.ranking else ("chosen", "rejected")[i]


@dataclass
class Rating:
    prompt: str
    completion: str
    label: float
    source: str
    labeler: str | None = None


@dataclass
class Candidate:
    completion: str
    model: str
    sampling: dict
    """The settings it was sampled with: temperature, top_p, top_k, max_new_tokens, seed."""


@dataclass
class Candidates:
    """The completions offered to labelers for one prompt."""

    prompt: str
    candidates: list[Candidate]
    source: str

    def to_record(self) -> dict:
        return {"prompt": self.prompt, "candidates": [vars(c) for c in self.candidates]}


# ---------------------------------------------------------------- reading raw records


def _jsonl(path: Path) -> Iterator[tuple[str, Any]]:
    with path.open("rb") as f:
        for number, raw in enumerate(f, start=1):
            where = f"{path}:{number}"
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                yield where, DataError(where, f"not valid UTF-8 (byte {exc.start} of the line)")
                continue
            if not text.strip():
                continue
            try:
                yield where, json.loads(text)
            except json.JSONDecodeError as exc:
                yield where, DataError(where, f"not valid JSON: {exc.msg} at column {exc.colno}")


def _json(path: Path) -> Iterator[tuple[str, Any]]:
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise DataError(f"{path}:{line}", "not valid UTF-8") from None
    decoder = json.JSONDecoder()
    pos = _skip_space(text, 0)
    if text[pos : pos + 1] != "[":
        try:  # a single object, or {"data": [...]} is not supported: say what is expected.
            json.loads(text)
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}:{exc.lineno}", f"not valid JSON: {exc.msg}") from None
        raise DataError(f"{path}:1", "a .json file must hold a list of records (or use .jsonl)")
    pos = _skip_space(text, pos + 1)
    while text[pos : pos + 1] != "]":
        line = text.count("\n", 0, pos) + 1
        try:
            value, pos = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}:{exc.lineno}", f"not valid JSON: {exc.msg}") from None
        yield f"{path}:{line}", value
        pos = _skip_space(text, pos)
        if text[pos : pos + 1] == ",":
            pos = _skip_space(text, pos + 1)
        elif text[pos : pos + 1] != "]":
            line = text.count("\n", 0, pos) + 1
            raise DataError(f"{path}:{line}", "not valid JSON: expected ',' or ']' between records")


def _skip_space(text: str, pos: int) -> int:
    while pos < len(text) and text[pos] in " \t\r\n":
        pos += 1
    return pos


def _csv(path: Path) -> Iterator[tuple[str, Any]]:
    try:
        with path.open(encoding="utf-8", newline="") as f:
            reader = csv.DictReader(f)
            start = 2
            for row in reader:
                where = f"{path}:{start}"
                start = reader.line_num + 1
                if None in row:
                    yield where, DataError(where, "more values than there are columns in the header")
                    continue
                yield where, {k: _csv_value(v) for k, v in row.items()}
    except UnicodeDecodeError as exc:
        line = path.read_bytes()[: exc.start].count(b"\n") + 1
        raise DataError(f"{path}:{line}", "not valid UTF-8") from None


def _csv_value(value: str | None) -> Any:
    """CSV has only strings: a cell that holds a JSON list (a ranking) or a number is read as one."""
    if value is None:
        return None
    stripped = value.strip()
    if stripped.startswith("["):
        try:
            return json.loads(stripped)
        except json.JSONDecodeError:
            return value
    return value


def _table_rows(rows: Iterator[dict], name: str) -> Iterator[tuple[str, Any]]:
    for index, row in enumerate(rows):
        yield f"{name} row {index}", row


def read_records(source: str | Path) -> Iterator[tuple[str, Any]]:
    """Yield (where, record) pairs; `record` is a DataError where the raw record is unreadable."""
    path = Path(source)
    if path.suffix in LOCAL_SUFFIXES:
        if not path.exists():
            raise DataError(str(path), "file not found")
        if path.suffix == ".jsonl":
            yield from _jsonl(path)
        elif path.suffix == ".json":
            yield from _json(path)
        elif path.suffix == ".csv":
            yield from _csv(path)
        else:
            import pyarrow.parquet as pq

            yield from _table_rows(iter(pq.read_table(path).to_pylist()), str(path))
        return
    if path.exists():
        raise DataError(str(path), f"unsupported file type; use one of {', '.join(LOCAL_SUFFIXES)}")
    import datasets  # a hub dataset: users have internet, the tests use local files

    name, _, split = str(source).partition(":")
    dataset = datasets.load_dataset(name, split=split or "train")
    yield from _table_rows(iter(dataset), f"{name}[{split or 'train'}]")


# ---------------------------------------------------------------- field checks


def _text(record: dict, key: str, where: str) -> str:
    if key not in record or record[key] is None:
        raise DataError(where, "missing", key)
    value = record[key]
    if not isinstance(value, str):
        raise DataError(where, f"expected a string, got {type(value).__name__}", key)
    if not value.strip():
        raise DataError(where, "empty", key)
    return value


def _number(record: dict, key: str, where: str, default: float | None = None) -> float:
    value = record.get(key)
    if value is None or value == "":
        if default is None:
            raise DataError(where, "missing", key)
        return default
    if isinstance(value, str):  # CSV cells
        try:
            value = float(value)
        except ValueError:
            raise DataError(where, f"expected a number, got {value!r}", key) from None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise DataError(where, f"expected a number, got {type(value).__name__}", key)
    if not math.isfinite(value):
        raise DataError(where, f"expected a finite number, got {value}", key)
    return float(value)


def _labeler(record: dict, where: str) -> str | None:
    value = record.get("labeler")
    if value is None or value == "":
        return None
    if not isinstance(value, (str, int)) or isinstance(value, bool):
        raise DataError(where, f"expected a string, got {type(value).__name__}", "labeler")
    return str(value)


def _object(record: Any, where: str) -> dict:
    if isinstance(record, DataError):
        raise record
    if not isinstance(record, dict):
        raise DataError(where, f"expected a JSON object, got {type(record).__name__}")
    return record


def parse_demonstration(record: Any, where: str) -> Demonstration:
    record = _object(record, where)
    if "messages" in record and "prompt" not in record:
        messages = record["messages"]
        if not isinstance(messages, list) or not messages:
            raise DataError(where, "expected a non-empty list of {role, content}", "messages")
        for i, message in enumerate(messages):
            if not isinstance(message, dict):
                raise DataError(where, "expected an object with role and content", f"messages[{i}]")
            role = _text(message, "role", where) if "role" in message else None
            if role is None:
                raise DataError(where, "missing", f"messages[{i}].role")
            if role not in ("system", "user", "assistant"):
                raise DataError(where, f"unknown role {role!r} (system, user or assistant)", f"messages[{i}].role")
            if not isinstance(message.get("content"), str) or not message["content"].strip():
                raise DataError(where, "missing or empty", f"messages[{i}].content")
        if messages[-1]["role"] != "assistant":
            raise DataError(where, "the last message must be the assistant's (the target)", "messages")
        return Demonstration(prompt="", completion="", source=where, messages=messages)
    return Demonstration(_text(record, "prompt", where), _text(record, "completion", where), where)


def parse_prompt(record: Any, where: str) -> Prompt:
    return Prompt(_text(_object(record, where), "prompt", where), where)


def parse_feedback(record: Any, where: str) -> Comparison | Rating:
    """A pairwise preference, a ranking or a rating, told apart by their fields."""
    record = _object(record, where)
    prompt = _text(record, "prompt", where)
    if "completions" in record:
        completions = record["completions"]
        if not isinstance(completions, list):
            raise DataError(where, f"expected a list of strings, got {type(completions).__name__}", "completions")
        if len(completions) < 2:
            raise DataError(where, f"a ranking needs at least 2 completions, got {len(completions)}", "completions")
        for i, text in enumerate(completions):
            if not isinstance(text, str) or not text.strip():
                raise DataError(where, "expected a non-empty string", f"completions[{i}]")
        seen: dict[str, int] = {}
        for i, text in enumerate(completions):
            if text in seen:
                raise DataError(where, f"duplicates completions[{seen[text]}]", f"completions[{i}]")
            seen[text] = i
        return Comparison(prompt, list(completions), where, labeler=_labeler(record, where), ranking=True)
    if "chosen" in record or "rejected" in record:
        chosen, rejected = _text(record, "chosen", where), _text(record, "rejected", where)
        if chosen == rejected:
            raise DataError(where, "the same text as 'chosen'", "rejected")
        margin = _number(record, "margin", where, default=0.0)
        return Comparison(prompt, [chosen, rejected], where, margin=margin, labeler=_labeler(record, where))
    if "label" in record or "completion" in record:
        return Rating(prompt, _text(record, "completion", where), _number(record, "label", where), where, _labeler(record, where))
    raise DataError(where, "missing: a record needs 'chosen'/'rejected', 'completions' or 'completion'/'label'", "chosen")


def parse_candidates(record: Any, where: str) -> Candidates:
    record = _object(record, where)
    prompt = _text(record, "prompt", where)
    items = record.get("candidates")
    if not isinstance(items, list) or not items:
        raise DataError(where, "expected a non-empty list of {completion, model, sampling}", "candidates")
    candidates = []
    for i, item in enumerate(items):
        if not isinstance(item, dict):
            raise DataError(where, "expected an object", f"candidates[{i}]")
        if not isinstance(item.get("completion"), str):
            raise DataError(where, "missing or not a string", f"candidates[{i}].completion")
        sampling = item.get("sampling", {})
        if not isinstance(sampling, dict):
            raise DataError(where, "expected an object", f"candidates[{i}].sampling")
        candidates.append(Candidate(item["completion"], str(item.get("model", "")), sampling))
    return Candidates(prompt, candidates, where)


# ---------------------------------------------------------------- loading whole files

T = TypeVar("T")
U = TypeVar("U")


class Loaded(list):
    """The records of one or more sources; `skipped` counts the malformed ones left out on request."""

    def __init__(self):
        super().__init__()
        self.skipped = 0
        self.first_error: str | None = None


def keep_valid(items: Iterable[T], convert: Callable[[T], U], skip_invalid: bool, what: str) -> Loaded:
    """`convert` of every item. An item it rejects with a DataError (a malformed record, a prompt
    too long for the model) stops the run, or with `skip_invalid` is left out, counted and
    reported once; where every item is left out, nothing is left to train on, and that stops the
    run too."""
    converted, first = Loaded(), None
    for item in items:
        try:
            converted.append(convert(item))
        except DataError as exc:
            if not skip_invalid:
                raise
            converted.skipped += 1
            first = first or exc
    converted.first_error = first and str(first)
    if first is not None and not converted:
        raise DataError(first.where, f"{first.reason}; skip_invalid left out all {converted.skipped} records ({what}), so none is left", first.field)
    if converted.skipped:
        log.warning("skipped %d %s (skip_invalid is set); the first: %s", converted.skipped, what, converted.first_error)
    return converted


def load(
    sources: str | Path | list[str | Path], parse: Callable[[Any, str], T], skip_invalid: bool = False
) -> Loaded:
    """Parse every record of `sources` with `parse`; stop at the first bad one unless `skip_invalid`."""
    sources = [sources] if isinstance(sources, (str, Path)) else sources
    rows = (row for source in sources for row in read_records(source))
    records = keep_valid(rows, lambda row: parse(row[1], row[0]), skip_invalid, "invalid records")
    if not records:
        raise DataError(", ".join(map(str, sources)), "no records")
    return records


def load_demonstrations(sources, skip_invalid: bool = False) -> Loaded:
    return load(sources, parse_demonstration, skip_invalid)


def load_prompts(sources, skip_invalid: bool = False) -> Loaded:
    return load(sources, parse_prompt, skip_invalid)


def load_feedback(sources, skip_invalid: bool = False) -> Loaded:
    return load(sources, parse_feedback, skip_invalid)


def load_candidates(sources, skip_invalid: bool = False) -> Loaded:
    return load(sources, parse_candidates, skip_invalid)


def write_jsonl(path: str | Path, records: list[dict]) -> None:
    """Write records as JSONL, atomically (a temporary file renamed into place)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    with tmp.open("w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
    tmp.replace(path)
