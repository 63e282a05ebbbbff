"""Reward sources: anything that turns (prompt, completion) pairs into one score each.

    kind: model       a reward model trained by `rlhf reward` (its stored bias/gain applied)
    kind: classifier  an existing sequence classifier; the logit of `label` scores the completion
    kind: function    a Python function `module:function`, called as
                      fn(prompts=[...], completions=[...]) -> list[float]  (TRL's signature)
    kind: judge       an AI judge (`reward.judge`: an endpoint or a local model, rlhf.judge) rates
                      each completion by a constitution, 1 to 7; the score is (rating - 1) / 6,
                      the expected rating where the judge gives probabilities: how likely "good"

A prompt reaches the source as the record gave it, a string or a list of messages, so that a
reward model renders the conversation exactly as `rlhf reward` rendered it in training. A
function gets TRL's arguments: after a conversational prompt, each completion as a list of
messages ([{"role": "assistant", "content": ...}]).

    rlhf score --reward runs/demo/reward/model --input samples.jsonl --out scored.jsonl
"""

from __future__ import annotations

import importlib
import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Literal, Protocol

import torch
from tqdm.auto import tqdm

from rlhf.config import ConfigError, PositiveInt
from rlhf.data import (
    Content, DataError, Demonstration, as_text, content_key, load, load_demonstrations, parse_candidates, parse_demonstration, reply_text,
    write_jsonl,
)
from rlhf.encoding import pad, render_sequence
from rlhf.judge import JudgeConfig, check_judge
from rlhf.models import check_model_path, context_length, load_sequence_classifier, load_tokenizer


class RewardSource(Protocol):
    def __call__(self, prompts: list[Content], completions: list[Content]) -> torch.Tensor:
        """(B,) float32 scores, one per (prompt, completion)."""


@dataclass
class RewardSourceConfig:
    kind: Literal["model", "classifier", "function", "judge"] = "model"
    """A trained reward model, an existing classifier, a Python function, or an AI judge (`judge`)."""
    path: str = ""
    """Model directory or hub id; for a function, `module:function`."""
    label: str = ""
    """Classifier only: the label (name or index) whose logit is the reward, e.g. "not toxic"."""
    labeler: str = ""
    """A personal reward model only (`reward.personal.enabled`): the labeler whose score is read; empty: the pooled score."""
    batch_size: PositiveInt = 32
    """Sequences per forward pass."""
    judge: JudgeConfig = field(default_factory=JudgeConfig)
    """kind judge only: the judge, its constitution and its cache (the keys of the recipe's `judge` section)."""
    reference: str = ""
    """kind judge only: reference responses, one per prompt ({prompt, completion} records, or the
    candidates file of `rlhf generate --num 1`); the reward is then the judge's P(the policy's
    response is better than the reference), asked in both orders (judge.both_orders), in place of
    its 1-7 rating."""


class SequenceClassifierScore:
    """Scores from a sequence-classification model, read at the last real token (checklist item 4).

    A trained reward model sees prompt and completion rendered as in training (`render_sequence`,
    which `rlhf reward` builds its sequences with too), and its stored normalisation
    `reward_gain * (logit + reward_bias)` is applied. A classifier sees the completion's text
    alone, what it was trained to judge. `score_band` is a trained reward model's stored
    `reward_score_band`, the 5th and 95th percentiles of its scores on its held-out completions,
    or None. A personal reward model's labeler reads `logit + weight * logits[:, column]`, their
    shrunk departure from the pooled score added (`rlhf.reward`).
    """

    def __init__(
        self, model, tokenizer, label_index: int = 0, reward_model: bool = True, batch_size: int = 32, bias: float = 0.0, gain: float = 1.0,
        score_band: tuple[float, float] | None = None, personal: tuple[int, float] | None = None,
    ):
        self.model, self.tokenizer = model.eval(), tokenizer
        self.index, self.is_reward_model = label_index, reward_model
        self.bias, self.gain, self.batch_size = bias, gain, batch_size
        self.score_band, self.personal = score_band, personal
        self.device = next(model.parameters()).device
        self.max_length = context_length(model.config)
        self.same_tokenizer: dict[int, bool] = {}  # id(policy tokenizer) -> reads_ids_of's answer

    @classmethod
    def from_pretrained(cls, path: str, label: str | None = None, batch_size: int = 32, device: str | torch.device = "cpu", labeler: str = ""):
        """`label` None: a reward model trained by rlhf (for `labeler`, or pooled); else the classifier label to read."""
        reward_model = label is None
        tokenizer = load_tokenizer(path, require_eos=reward_model)
        model = load_sequence_classifier(path, tokenizer).to(device)
        config = model.config
        if reward_model:
            bias, gain = float(getattr(config, "reward_bias", 0.0)), float(getattr(config, "reward_gain", 1.0))
            band = getattr(config, "reward_score_band", None)
            band = tuple(band) if band else None
            if not labeler:
                return cls(model, tokenizer, 0, True, batch_size, bias, gain, band)
            entry = personal_entry(config, labeler, path)
            band = tuple(entry["score_band"]) if entry.get("score_band") else None
            return cls(model, tokenizer, 0, True, batch_size, entry["bias"], entry["gain"], band, (entry["column"], entry["weight"]))
        return cls(model, tokenizer, label_index(config, label, path), False, batch_size)

    def encode(self, prompt: Content, completion: Content) -> list[int]:
        tok = self.tokenizer
        if not self.is_reward_model:
            return tok(reply_text(completion), truncation=True, max_length=min(self.max_length, tok.model_max_length))["input_ids"]
        ids = render_sequence(tok, prompt, completion, "reward model input")
        return ids[-self.max_length :]  # an over-long prompt loses its start; the score is read at the end

    def reads_ids_of(self, tokenizer) -> bool:
        """Whether the token ids of a policy with `tokenizer` can be scored as they are
        (`score_ids`) rather than decoded and encoded again: a trained reward model whose
        tokenizer is the policy's (the same vocabulary, merges, normalisation and special tokens)
        with the same chat template. Asked once per tokenizer."""
        key = id(tokenizer)
        if key not in self.same_tokenizer:
            mine, theirs = self.tokenizer, tokenizer
            self.same_tokenizer[key] = (
                self.is_reward_model and mine.is_fast and theirs.is_fast
                and (mine.chat_template or "") == (theirs.chat_template or "")
                and (mine.eos_token_id, mine.pad_token_id, mine.bos_token_id) == (theirs.eos_token_id, theirs.pad_token_id, theirs.bos_token_id)
                and mine.backend_tokenizer.to_str() == theirs.backend_tokenizer.to_str()
            )
        return self.same_tokenizer[key]

    def sequence_ids(self, prompt_ids: list[int], response_ids: list[int], special: set[int]) -> list[int]:
        """The reward model's input for a plain-text prompt's response given as the policy's ids:
        what `encode` builds from the decoded text (the `special` token ids skipped, then EOS),
        without the text. They agree wherever encoding the decoded response gives back its ids."""
        ids = prompt_ids + [t for t in response_ids if t not in special] + [self.tokenizer.eos_token_id]
        return ids[-self.max_length :]

    @torch.no_grad()
    def score_ids(
        self, prompts: list[Content], query: torch.Tensor, query_mask: torch.Tensor, responses: torch.Tensor, mask: torch.Tensor,
        completions: list[Content],
    ) -> torch.Tensor:
        """Scores of a rollout batch read from its token ids (`reads_ids_of` the policy's tokenizer
        must hold): a plain-text prompt's response by `sequence_ids`, a conversation's by its
        decoded `completions` through the chat template as `__call__` does."""
        seqs, special = [], set(self.tokenizer.all_special_ids)
        for row, (prompt, completion) in enumerate(zip(prompts, completions)):
            if isinstance(prompt, str):
                seqs.append(self.sequence_ids(query[row][query_mask[row].bool()].tolist(), responses[row][mask[row].bool()].tolist(), special))
            else:
                seqs.append(self.encode(prompt, completion))
        return self.normalised(self.forward(seqs))

    @torch.no_grad()
    def forward(self, seqs: list[list[int]]) -> torch.Tensor:
        """(B, C) raw logits, every column of the head, of each token sequence."""
        scores = []
        for i in range(0, len(seqs), self.batch_size):
            ids, mask = pad(seqs[i : i + self.batch_size], self.tokenizer.pad_token_id)
            scores.append(self.model(input_ids=ids.to(self.device), attention_mask=mask.to(self.device)).logits.float().cpu())
        return torch.cat(scores)

    def columns(self, prompts: list[Content], completions: list[Content]) -> torch.Tensor:
        """(B, C) raw logits, every column of the head."""
        return self.forward([self.encode(p, c) for p, c in zip(prompts, completions)])

    def __call__(self, prompts: list[Content], completions: list[Content]) -> torch.Tensor:
        return self.normalised(self.columns(prompts, completions))

    def normalised(self, logits: torch.Tensor) -> torch.Tensor:
        """The score from the head's logits (B, C): the column read, a labeler's departure added, the stored normalisation."""
        raw = logits[:, self.index]
        if self.personal is not None:
            column, weight = self.personal
            raw = raw + weight * logits[:, column]
        return self.gain * (raw + self.bias)


def personal_entry(config, labeler: str, path: str, key: str = "reward.labeler") -> dict:
    """The stored column, shrinkage weight, bias and gain of one labeler of a personal reward model."""
    labelers = getattr(config, "reward_labelers", None) or {}
    if not labelers:
        raise ConfigError(f"{key}: {path} is not a personal reward model (train it with reward.personal.enabled=true); leave {key} empty for its score")
    if labeler not in labelers:
        raise ConfigError(f"{key}: {path} has no labeler {labeler!r}; it knows {sorted(labelers)}")
    return labelers[labeler]


def label_index(config, label: str, path: str) -> int:
    """The index of a classifier label given by name (as in config.id2label) or number."""
    if label.isdigit() and int(label) < config.num_labels:
        return int(label)
    names = {str(name).lower(): int(i) for i, name in config.id2label.items()}
    if label.lower() in names:
        return names[label.lower()]
    raise ConfigError(f"{path}: no label {label!r}; the classifier has {sorted(config.id2label.values())}")


class FunctionScore:
    """A Python function `module:function` with TRL's reward-function signature."""

    def __init__(self, spec: str):
        self.fn, self.spec = load_function(spec, "reward function"), spec

    def __call__(self, prompts: list[Content], completions: list[Content]) -> torch.Tensor:
        completions = [[{"role": "assistant", "content": c}] if isinstance(p, list) and isinstance(c, str) else c for p, c in zip(prompts, completions)]
        scores = self.fn(prompts=prompts, completions=completions)
        if len(scores) != len(prompts):
            raise ValueError(f"{self.spec} returned {len(scores)} scores for {len(prompts)} completions")
        return torch.tensor([float(s) for s in scores], dtype=torch.float32)


def parse_reference(record, where: str) -> Demonstration:
    """A reference response: a {prompt, completion} record whose completion is one response (a
    string, or a single assistant message), or a candidates record of `rlhf generate --num 1`."""
    if isinstance(record, dict) and "candidates" in record:
        candidates = parse_candidates(record, where)
        if len(candidates.candidates) != 1:
            raise DataError(where, f"a reference is one response, got {len(candidates.candidates)} candidates (rlhf generate --num 1)", "candidates")
        return Demonstration(candidates.prompt, candidates.candidates[0].completion, where)
    record = parse_demonstration(record, where)
    if record.messages is not None:
        raise DataError(where, "a reference is a {prompt, completion} record", "messages")
    if isinstance(record.completion, list):
        if len(record.completion) != 1:
            raise DataError(where, f"a reference is one assistant message, got {len(record.completion)} messages", "completion[1]")
        if record.completion[0].get("role") != "assistant":
            raise DataError(where, "a reference is the assistant's message", "completion[0].role")
    return record


def load_references(path: str) -> dict[str, Content]:
    """{prompt key: reference completion} from a JSONL of reference responses (`parse_reference`);
    a DataError naming the file, line and field for a bad record or a prompt given twice."""
    references: dict[str, Content] = {}
    for record in load(path, parse_reference):
        key = content_key(record.prompt)
        if key in references and references[key] != record.completion:
            raise DataError(record.source, "a second, different reference for a prompt given before", "prompt")
        references[key] = record.completion
    return references


def check_references(references: dict[str, Content], path: str, prompts: list[tuple[Content, str]], key: str) -> None:
    """A ConfigError naming `key` unless every (prompt, where it was read) has a reference response
    in `references` (read from `path`)."""
    missing = [(p, where) for p, where in prompts if content_key(p) not in references]
    if missing:
        prompt, where = missing[0]
        raise ConfigError(
            f"{key}: {path} has no reference response for {len(missing)} of {len(prompts)} prompts, the first "
            f"{f'at {where}' if where else 'of them'}: {as_text(prompt)[:200]!r}; give each prompt a {{prompt, completion}} record"
        )


class JudgeScore:
    """An AI judge's rating of each completion by its constitution, scaled to [0, 1]; or, given
    `reference` (a file of reference responses), the judge's probability that the completion is
    better than its prompt's reference, asked in both orders so that position bias cancels.

    One batch of questions per call, sent `judge.concurrency` at a time and cached on disk, so
    that a completion the policy writes again is not asked again. A rating the judge's answer
    does not give (unparseable) scores the batch's mean: it neither rewards nor punishes, and it
    is counted in `metrics()`, which the RL loop logs with each step."""

    def __init__(self, config: JudgeConfig, reference: str = ""):
        from rlhf.judge import Judge

        self.constitution = check_judge(config, "reward.judge")
        self.judge = Judge(config, progress=False)
        self.reference = reference
        self.references = load_references(reference) if reference else None
        self.unparseable = self.scored = 0

    def __call__(self, prompts: list[Content], completions: list[Content]) -> torch.Tensor:
        from rlhf.judge import judge_pairs, judge_ratings

        if self.references is not None:
            keys = [content_key(p) for p in prompts]
            if not all(k in self.references for k in keys):
                check_references(self.references, self.reference, [(p, "") for p in prompts], "reward.reference")
            pairs = [(p, c, self.references[k], None) for p, c, k in zip(prompts, completions, keys)]
            scores = [v.value for v in judge_pairs(self.judge, self.constitution, pairs)]
        else:
            verdicts = judge_ratings(self.judge, self.constitution, [(p, c, None) for p, c in zip(prompts, completions)])
            scores = [(v.value - 1) / 6 if v.value is not None else None for v in verdicts]
        known = [s for s in scores if s is not None]
        fill = sum(known) / len(known) if known else 0.5
        self.unparseable += len(scores) - len(known)
        self.scored += len(scores)
        return torch.tensor([fill if s is None else s for s in scores], dtype=torch.float32)

    def metrics(self) -> dict[str, float]:
        cache = self.judge.cache
        return {"judge/cache_hit_rate": cache.hit_rate or 0.0, "judge/cache_hits": float(cache.hits), "judge/unparseable": float(self.unparseable)}


def load_function(spec: str, key: str):
    """The function that `module:function` names, its module imported as `python -m` would find
    it; a ConfigError naming `key` when it cannot be had."""
    module, _, name = spec.partition(":")
    if not module or not name:
        raise ConfigError(f"{key}: must look like module:function, got {spec!r}")
    if os.getcwd() not in sys.path:  # a module of the user's project
        sys.path.insert(0, os.getcwd())
    try:
        fn = getattr(importlib.import_module(module), name, None)
    except Exception as exc:  # the user's module failed to import, whatever the reason
        raise ConfigError(f"{key}: cannot import {module!r} of {spec!r}: {type(exc).__name__}: {exc}") from None
    if not callable(fn):
        raise ConfigError(f"{key}: module {module!r} has no function {name!r}")
    return fn


def check_reward_source(config: RewardSourceConfig, key: str) -> None:
    """Refuse, before anything loads, a reward source the recipe alone shows cannot load: no
    path, a function that cannot be imported, a classifier without a label."""
    if config.kind == "judge":
        check_judge(config.judge, f"{key}.judge")
        return
    if config.reference:
        raise ConfigError(f"{key}.reference: only an AI judge (kind judge) compares with reference responses, got kind {config.kind}")
    if not config.path:
        raise ConfigError(f"{key}.path is required: a model directory, hub id or module:function")
    if config.kind == "function":
        load_function(config.path, f"{key}.path")
    elif config.kind == "classifier" and not config.label:
        raise ConfigError(f"{key}.label is required with kind classifier: the class whose logit is the reward")
    if config.labeler and config.kind != "model":
        raise ConfigError(f"{key}.labeler: only a personal reward model (kind model) has scores per labeler, got kind {config.kind}")


def check_reward_path(config: RewardSourceConfig, key: str) -> None:
    """Refuse a reward model or classifier at a local path that does not exist (an earlier stage
    may write it: checked when the stage that reads it starts)."""
    if config.kind == "judge":
        return
    if config.kind != "function":
        check_model_path(f"{key}.path", config.path)
    stored = Path(config.path) / "config.json"
    if config.labeler and stored.is_file():
        try:
            values = json.loads(stored.read_text())
        except (OSError, ValueError) as exc:
            raise ConfigError(f"{key}.path: cannot read {stored}: {exc}") from None
        personal_entry(SimpleNamespace(**values), config.labeler, config.path, f"{key}.labeler")


def load_reward_source(config: RewardSourceConfig, device: str | torch.device = "cpu") -> RewardSource:
    if config.kind == "judge":
        return JudgeScore(config.judge, config.reference)
    if not config.path:
        raise ConfigError("the reward source needs a path (a model directory, hub id or module:function)")
    if config.kind == "function":
        return FunctionScore(config.path)
    if config.kind == "classifier" and not config.label:
        raise ConfigError(f"{config.path}: a classifier reward needs `label`, the class whose logit is the reward")
    label = config.label if config.kind == "classifier" else None
    return SequenceClassifierScore.from_pretrained(config.path, label, config.batch_size, device, config.labeler)


def score_file(source: RewardSource, input_path: str | Path, out_path: str | Path, batch_size: int = 64) -> list[float]:
    """Score every {prompt, completion} record of a file (strings or messages); write the records
    with a `score` field."""
    records = load_demonstrations(input_path)
    for record in records:
        if record.messages is not None:
            raise DataError(record.source, "rlhf score reads {prompt, completion} records", "messages")
    scores: list[float] = []
    for i in tqdm(range(0, len(records), batch_size), desc="scoring", dynamic_ncols=True):
        chunk = records[i : i + batch_size]
        scores.extend(source([r.prompt for r in chunk], [r.completion for r in chunk]).tolist())
    write_jsonl(out_path, [{"prompt": r.prompt, "completion": r.completion, "score": s} for r, s in zip(records, scores)])
    return scores
