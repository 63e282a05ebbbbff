"""Record formats that every stage reads, and errors that name the file, the line and the field.

Field names are the ones TRL users already have in their data:

    demonstrations  {"prompt", "completion"}  or  {"messages": [{"role", "content"}, ...]}
                    or ShareGPT {"conversations": [{"from": human|gpt|system, "value"}, ...]}
    prompts         {"prompt"}
    preferences     {"prompt", "chosen", "rejected", "margin"?, "labeler"?}
                    or {"chosen", "rejected"} as whole conversations (an implicit prompt)
    rankings        {"prompt", "completions": [best, ..., worst], "labeler"?}
    ratings         {"prompt", "completion", "label"}   label: 0/1 (thumbs) or a number (a score)
    candidates      {"prompt", "candidates": [{"completion", "model", "sampling": {...}}, ...]}
                    (what `rlhf generate` writes and the labeling app reads)

Every prompt and completion comes in TRL's standard format, a string, or in its conversational
format, a list of {"role", "content"} messages (roles system, user, assistant, tool); a
conversational completion starts with the assistant's turn, and a string completion after a
conversational prompt is the assistant's reply. Preferences without a `prompt` whose chosen and
rejected are whole conversations (Anthropic hh-rlhf as TRL ships it) take the messages they
share as the prompt and the rest as the completions; a string `prompt` beside such
conversations is ignored, as TRL does. `rlhf.encoding` turns both formats into tokens.

Sources: a local .jsonl / .json / .csv / .parquet file, a folder written by
`datasets.save_to_disk` (`path`, or `path:split` for a DatasetDict; the default split is
train), or a dataset name on the Hugging Face hub (`name`, `name:split` or `name:config:split`,
read with `datasets.load_dataset`). Extra fields are ignored; a malformed record stops the run
with a `DataError` unless `skip_invalid` is set, in which case the number of skipped records is
reported.
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
ROLES = ("system", "user", "assistant", "tool")
SHAREGPT_ROLES = {"human": "user", "gpt": "assistant", "system": "system"}

Content = str | list[dict]
"""A prompt or a completion: a string (standard format) or a list of messages (conversational)."""


class DataError(ValueError):
    """A record that cannot be used; the message names file, line (or row) and field."""

    def __init__(self, where: str, message: str, field: str | None = None):
        self.where, self.field, self.reason = where, field, message
        super().__init__(f"{where}: field '{field}': {message}" if field else f"{where}: {message}")


@dataclass
class Demonstration:
    prompt: Content
    completion: Content
    source: str
    messages: list[dict] | None = None
    """The conversation, when the record came as {"messages"} or {"conversations"} (prompt and
    completion are then empty): every assistant turn in it is a target."""


@dataclass
class Prompt:
    prompt: Content
    source: str
    kind: str | None = None
    """The kind of prompt (a record's optional `kind`, e.g. "harmful" for a red-team prompt): which principles of a constitution apply."""


@dataclass
class Comparison:
    """A pairwise preference or a ranking: `completions` run best to worst (a pair has two)."""

    prompt: Content
    completions: list[Content]
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
    prompt: Content
    completion: Content
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
    """The completions offered to labelers for one prompt (kept as given: a string or messages)."""

    prompt: Content
    candidates: list[Candidate]
    source: str
    kind: str | None = None
    """The prompt's kind, as its prompt record gave it (see Prompt)."""

    def to_record(self) -> dict:
        record = {"prompt": self.prompt, "candidates": [vars(c) for c in self.candidates]}
        return record | ({"kind": self.kind} if self.kind else {})


def as_text(content: Content) -> str:
    """A prompt or completion as plain text for people to read (a report, an excerpt): a
    conversation as "role: content" paragraphs. Never what a model is given (see rlhf.encoding)."""
    if isinstance(content, str):
        return content
    return "\n\n".join(f"{m['role']}: {m['content']}" for m in content)


def content_key(content: Content) -> str:
    """A prompt or completion as one string to match on (a dict key): the same for equal content,
    a string or a conversation."""
    return json.dumps(content, ensure_ascii=False, sort_keys=True)


def reply_text(content: Content) -> str:
    """The text of a completion without roles: a classifier judges this alone."""
    return content if isinstance(content, str) else "\n".join(m["content"] for m in content)


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
    saved = _saved_dataset(str(source))
    if saved is not None:
        yield from _disk_rows(*saved)
        return
    if path.exists():
        raise DataError(str(path), f"unsupported file type; use one of {', '.join(LOCAL_SUFFIXES)} or a datasets.save_to_disk folder")
    import datasets  # a hub dataset: users have internet, the tests use local files

    name, config, split = hub_name(str(source))
    dataset = datasets.load_dataset(name, config, split=split)
    yield from _table_rows(iter(dataset), f"{name}{':' + config if config else ''}[{split}]")


def hub_name(source: str) -> tuple[str, str | None, str]:
    """(name, config, split) of a hub dataset given as `name`, `name:split` or `name:config:split`."""
    parts = source.split(":")
    if len(parts) > 3 or not parts[0]:
        raise DataError(source, "a hub dataset is name, name:split or name:config:split")
    config = (parts[1] or None) if len(parts) == 3 else None
    split = parts[-1] if len(parts) > 1 and parts[-1] else "train"
    return parts[0], config, split


def _saved_dataset(source: str) -> tuple[Path, str | None] | None:
    """(folder, split or None) when `source` is a `datasets.save_to_disk` folder, or one followed
    by `:split`; None otherwise."""
    path, split = Path(source), None
    if not path.is_dir():
        head, sep, tail = source.rpartition(":")
        if not sep or not Path(head).is_dir():
            return None
        path, split = Path(head), tail
    if (path / "dataset_dict.json").is_file() or (path / "state.json").is_file():
        return path, split
    return None


def _disk_rows(path: Path, split: str | None) -> Iterator[tuple[str, Any]]:
    import datasets

    data = datasets.load_from_disk(str(path))
    if isinstance(data, datasets.DatasetDict):
        split = split or "train"
        if split not in data:
            raise DataError(str(path), f"no split {split!r}; the folder holds {', '.join(data)} (choose one as {path}:SPLIT)")
        yield from _table_rows(iter(data[split]), f"{path}[{split}]")
    elif split:
        raise DataError(f"{path}:{split}", "the folder holds one Dataset, without splits: name the folder alone")
    else:
        yield from _table_rows(iter(data), str(path))


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


def _messages(value: Any, where: str, field: str) -> list[dict]:
    """A checked list of {role, content} messages. Keys set to None are dropped: a table
    (parquet, a hub dataset) gives every message every key that any message has."""
    if not isinstance(value, list) or not value:
        raise DataError(where, "expected a non-empty list of {role, content}", field)
    messages = []
    for i, message in enumerate(value):
        if not isinstance(message, dict):
            raise DataError(where, "expected an object with role and content", f"{field}[{i}]")
        message = {k: v for k, v in message.items() if v is not None}
        role = message.get("role")
        if role is None or role == "":
            raise DataError(where, "missing", f"{field}[{i}].role")
        if role not in ROLES:
            raise DataError(where, f"unknown role {role!r} ({', '.join(ROLES[:-1])} or {ROLES[-1]})", f"{field}[{i}].role")
        if not isinstance(message.get("content"), str) or not message["content"].strip():
            raise DataError(where, "missing or empty", f"{field}[{i}].content")
        messages.append(message)
    return messages


def _sharegpt(value: Any, where: str) -> list[dict]:
    """ShareGPT's {"from", "value"} turns as messages: human -> user, gpt -> assistant."""
    if not isinstance(value, list) or not value:
        raise DataError(where, "expected a non-empty list of {from, value}", "conversations")
    messages = []
    for i, turn in enumerate(value):
        if not isinstance(turn, dict):
            raise DataError(where, "expected an object with from and value", f"conversations[{i}]")
        if turn.get("from") not in SHAREGPT_ROLES:
            raise DataError(where, f"unknown speaker {turn.get('from')!r} ({', '.join(SHAREGPT_ROLES)})", f"conversations[{i}].from")
        if not isinstance(turn.get("value"), str) or not turn["value"].strip():
            raise DataError(where, "missing or empty", f"conversations[{i}].value")
        messages.append({"role": SHAREGPT_ROLES[turn["from"]], "content": turn["value"]})
    return messages


def _prompt(record: dict, where: str) -> Content:
    """The record's prompt: a string or a list of messages."""
    value = record.get("prompt")
    if value is None and ("messages" in record or "conversations" in record):
        kind = "messages" if "messages" in record else "conversations"
        raise DataError(where, f"missing; a {{{kind}}} record is a demonstration for SFT, here a record needs a 'prompt' (a string or a list of messages)", "prompt")
    if value is None and isinstance(record.get("chosen"), str):
        raise DataError(where, "missing; string chosen/rejected need one (the prompt is implicit only when they are whole conversations, lists of messages)", "prompt")
    if isinstance(value, list) and all(isinstance(m, dict) for m in value):
        return _messages(value, where, "prompt")
    if isinstance(value, list):
        raise DataError(where, "expected a string or a list of {role, content} messages, got a list of values", "prompt")
    return _text(record, "prompt", where)


def _completion(value: Any, prompt: Content, where: str, field: str) -> Content:
    """A completion of `prompt`: a string, or after a conversational prompt a list of messages
    that starts with the assistant's turn."""
    if isinstance(value, list):
        if isinstance(prompt, str):
            raise DataError(where, "a list of messages needs a conversational prompt (a list of messages too)", field)
        messages = _messages(value, where, field)
        if messages[0]["role"] != "assistant":
            raise DataError(where, f"a completion starts with the assistant's turn, not the {messages[0]['role']}'s", f"{field}[0].role")
        return messages
    if value is None:
        raise DataError(where, "missing", field)
    if not isinstance(value, str):
        raise DataError(where, f"expected a string or a list of messages, got {type(value).__name__}", field)
    if not value.strip():
        raise DataError(where, "empty", field)
    return value


def _implicit_prompt(record: dict, where: str) -> tuple[list[dict], list[dict], list[dict]]:
    """(prompt, chosen, rejected) of whole conversations: the prompt is the messages both open
    with, and each completion the rest, from an assistant turn on."""
    chosen, rejected = _messages(record["chosen"], where, "chosen"), _messages(record["rejected"], where, "rejected")
    n = 0
    while n < min(len(chosen), len(rejected)) and chosen[n] == rejected[n]:
        n += 1
    if len(chosen) == len(rejected) == n:
        raise DataError(where, "the same conversation as 'chosen'", "rejected")
    if n == 0:
        raise DataError(where, "opens with another message than 'chosen' does: without a list 'prompt', the prompt is the messages they share", "rejected")
    for key, conversation in (("chosen", chosen), ("rejected", rejected)):
        if n == len(conversation):
            raise DataError(where, "holds only the messages it shares with the other side: nothing is left to compare", key)
        if conversation[n]["role"] != "assistant":
            role = conversation[n]["role"]
            raise DataError(where, f"the shared prompt (messages 0-{n - 1}) is followed by a {role} turn, not the assistant's", f"{key}[{n}].role")
    return chosen[:n], chosen[n:], rejected[n:]


def parse_demonstration(record: Any, where: str) -> Demonstration:
    record = _object(record, where)
    if "prompt" not in record and ("messages" in record or "conversations" in record):
        if "messages" in record:
            messages = _messages(record["messages"], where, "messages")
        else:
            messages = _sharegpt(record["conversations"], where)
        field = "messages" if "messages" in record else "conversations"
        if messages[-1]["role"] != "assistant":
            raise DataError(where, "the last message must be the assistant's (the target)", field)
        return Demonstration(prompt="", completion="", source=where, messages=messages)
    prompt = _prompt(record, where)
    return Demonstration(prompt, _completion(record.get("completion"), prompt, where, "completion"), where)


def _kind(record: dict, where: str) -> str | None:
    kind = record.get("kind")
    if kind is not None and not (isinstance(kind, str) and kind.strip()):
        raise DataError(where, f"expected a non-empty string (the kind of prompt), got {kind!r}", "kind")
    return kind.strip() if kind else None


def parse_prompt(record: Any, where: str) -> Prompt:
    record = _object(record, where)
    return Prompt(_prompt(record, where), where, _kind(record, where))


def parse_feedback(record: Any, where: str) -> Comparison | Rating:
    """A pairwise preference, a ranking or a rating, told apart by their fields."""
    record = _object(record, where)
    conversations = isinstance(record.get("chosen"), list) and isinstance(record.get("rejected"), list)
    if conversations and not isinstance(record.get("prompt"), list):
        prompt, chosen, rejected = _implicit_prompt(record, where)
        margin = _number(record, "margin", where, default=0.0)
        return Comparison(prompt, [chosen, rejected], where, margin=margin, labeler=_labeler(record, where))
    prompt = _prompt(record, where)
    if "completions" in record:
        completions = record["completions"]
        if not isinstance(completions, list):
            raise DataError(where, f"expected a list of strings, got {type(completions).__name__}", "completions")
        if len(completions) < 2:
            raise DataError(where, f"a ranking needs at least 2 completions, got {len(completions)}", "completions")
        for i, text in enumerate(completions):
            if not isinstance(text, (str, list)) or (isinstance(text, str) and not text.strip()):
                raise DataError(where, "expected a non-empty string (or a list of messages)", f"completions[{i}]")
        completions = [_completion(c, prompt, where, f"completions[{i}]") for i, c in enumerate(completions)]
        for i, text in enumerate(completions):
            first = completions.index(text)
            if first < i:
                raise DataError(where, f"duplicates completions[{first}]", f"completions[{i}]")
        return Comparison(prompt, completions, where, labeler=_labeler(record, where), ranking=True)
    if "chosen" in record or "rejected" in record:
        chosen, rejected = (_completion(record.get(key), prompt, where, key) for key in ("chosen", "rejected"))
        if chosen == rejected:
            raise DataError(where, "the same text as 'chosen'", "rejected")
        margin = _number(record, "margin", where, default=0.0)
        return Comparison(prompt, [chosen, rejected], where, margin=margin, labeler=_labeler(record, where))
    if "label" in record or "completion" in record:
        completion = _completion(record.get("completion"), prompt, where, "completion")
        return Rating(prompt, completion, _number(record, "label", where), where, _labeler(record, where))
    raise DataError(where, "missing: a record needs 'chosen'/'rejected', 'completions' or 'completion'/'label'", "chosen")


def parse_candidates(record: Any, where: str) -> Candidates:
    record = _object(record, where)
    prompt = _prompt(record, where)
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
    return Candidates(prompt, candidates, where, _kind(record, where))


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
