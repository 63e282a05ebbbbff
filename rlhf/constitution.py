"""A constitution: the written principles an AI judge applies (Bai et al. 2022, "Constitutional AI").

    constitution = load_constitution("rlhf/demo/constitution.yaml")
    constitution.for_kind("harmful")     # the principles that apply to a red-team prompt

Each principle has a name and a text, and optionally a weight (how much it counts when a judge
combines principles, default 1) and the kinds of prompt it applies to (empty: every prompt; a
prompt record's optional `kind` field names its kind). Two file formats:

YAML
    principles:
      - name: harmless
        text: Choose the response that does not insult or demean the user.
        weight: 2
        applies_to: [question, harmful]

Markdown, a `##` heading per principle, optional `weight:` and `applies to:` lines under it, then
the text:
    ## harmless
    weight: 2
    applies to: question, harmful

    Choose the response that does not insult or demean the user.

A mistake is a DataError naming the file, the line and the field.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from rlhf.data import DataError

NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_. -]*$")


@dataclass
class Principle:
    name: str
    text: str
    weight: float = 1.0
    applies_to: list[str] = field(default_factory=list)
    """Kinds of prompt it applies to; empty: every prompt."""


@dataclass
class Constitution:
    principles: list[Principle]
    source: str

    def for_kind(self, kind: str | None) -> list[Principle]:
        """The principles that apply to a prompt of this kind (None: a prompt without a kind)."""
        return [p for p in self.principles if not p.applies_to or (kind is not None and kind in p.applies_to)]

    def named(self, name: str) -> Principle:
        return next(p for p in self.principles if p.name == name)


def _principle(values: dict, where: str) -> Principle:
    unknown = sorted(set(values) - {"name", "text", "weight", "applies_to"})
    if unknown:
        raise DataError(where, "unknown field (a principle has name, text, weight, applies_to)", unknown[0])
    name, text = values.get("name"), values.get("text")
    if not isinstance(name, str) or not NAME.match(name.strip()):
        raise DataError(where, f"expected a short name (letters, digits, space, _ . -), got {name!r}", "name")
    if not isinstance(text, str) or not text.strip():
        raise DataError(where, "missing or empty: the principle as the judge should read it", "text")
    weight = values.get("weight", 1.0)
    if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not weight > 0:
        raise DataError(where, f"expected a number > 0, got {weight!r}", "weight")
    kinds = values.get("applies_to", [])
    kinds = [kinds] if isinstance(kinds, str) else kinds
    if not isinstance(kinds, list) or not all(isinstance(k, str) and k.strip() for k in kinds):
        raise DataError(where, f"expected a list of prompt kinds, got {kinds!r}", "applies_to")
    return Principle(name.strip(), " ".join(text.split()), float(weight), [k.strip() for k in kinds])


def _from_yaml(path: Path, text: str) -> list[Principle]:
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        raise DataError(f"{path}:{mark.line + 1}" if mark else str(path), f"not valid YAML: {getattr(exc, 'problem', exc)}") from None
    if not isinstance(data, dict) or not isinstance(data.get("principles"), list):
        raise DataError(f"{path}:1", "expected a mapping with a list of principles", "principles")
    nodes = dict((k.value, v) for k, v in root.value)["principles"].value
    principles = []
    for i, (values, node) in enumerate(zip(data["principles"], nodes)):
        where = f"{path}:{node.start_mark.line + 1}"
        if not isinstance(values, dict):
            raise DataError(where, "expected a mapping {name, text, weight?, applies_to?}", f"principles[{i}]")
        principles.append(_principle(values, where))
    return principles


def _from_markdown(path: Path, text: str) -> list[Principle]:
    principles, current = [], None
    for number, line in enumerate(text.splitlines(), 1):
        heading = re.match(r"^##\s+(.*?)\s*$", line)
        if heading:
            current = {"values": {"name": heading.group(1)}, "body": [], "line": number}
            principles.append(current)
            continue
        if current is None:
            continue  # a title or an introduction before the first principle
        setting = re.match(r"^(weight|applies to)\s*:\s*(.*?)\s*$", line, re.IGNORECASE)
        if setting and not current["body"]:
            key, value = setting.group(1).lower(), setting.group(2)
            if key == "weight":
                try:
                    current["values"]["weight"] = float(value)
                except ValueError:
                    raise DataError(f"{path}:{number}", f"expected a number > 0, got {value!r}", "weight") from None
            else:
                current["values"]["applies_to"] = [k.strip() for k in value.split(",") if k.strip()]
        elif line.strip() or current["body"]:
            current["body"].append(line)
    result = []
    for entry in principles:
        entry["values"]["text"] = "\n".join(entry["body"]).strip()
        result.append(_principle(entry["values"], f"{path}:{entry['line']}"))
    return result


def load_constitution(path: str | Path) -> Constitution:
    """Read a constitution file (.yaml, .yml or .md); a DataError names what is wrong and where."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(str(path), f"cannot read the constitution: {exc}") from None
    principles = _from_markdown(path, text) if path.suffix.lower() in (".md", ".markdown") else _from_yaml(path, text)
    if not principles:
        raise DataError(f"{path}:1", "no principles: a constitution needs at least one", "principles")
    seen: dict[str, int] = {}
    for i, p in enumerate(principles):
        if p.name in seen:
            raise DataError(str(path), f"principle {p.name!r} is named twice", f"principles[{i}].name")
        seen[p.name] = i
    return Constitution(principles, str(path))
