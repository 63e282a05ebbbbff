"""AI feedback: a judge that applies a written constitution (RLAIF, Lee et al. 2023; Constitutional AI, Bai et al. 2022).

    rlhf judge --config recipes/demo.yaml --candidates candidates.jsonl --out ai_prefs.jsonl --task pair

A judge is any OpenAI-compatible chat endpoint (`backend: http`: vLLM, llama.cpp's server,
ollama, a hosted API, `transformers serve`) or a Hugging Face causal LM in this process
(`backend: local`). It is asked, per task, with the templates below, which quote the principles:

    pair   which of responses A and B follows the principles better       -> "A" or "B"
    rank   the responses A, B, C, ... from best to worst                   -> "B > A > C"
    rate   how well one response follows them, 1 (worst) to 7 (best)       -> "1" .. "7"

How a judgement is made:
- When the endpoint returns token log-probs (vLLM, OpenAI; a local model always), the
  probabilities of the answer tokens are read ("A"/"B", "1".."7") instead of the text, as Lee et
  al. 2023 do: a pair's verdict is P(A), a rating the expected value. `transformers serve`
  (5.24) ignores the `logprobs` and `top_logprobs` fields of a chat completion ("Ignoring
  unsupported fields in the request"), so against it the answer's text is parsed.
- A pair or a ranking is judged in both orders (`both_orders`), and the two are averaged, so
  that a preference for a position cancels. A pair whose two orders prefer different responses
  is position-inconsistent; their share is the position-bias rate.
- Text is parsed strictly enough not to guess: an answer that names no choice, or several, is
  unparseable, counted and reported, and gives no label.
- `principles: all` quotes every principle in one question; `each` asks once per principle and
  combines the verdicts by the principles' weights (each one's is kept in the record).

Requests go out `concurrency` at a time, each retried `retries` times with exponential backoff
(a 429's Retry-After is honoured) and cut at `timeout` seconds. Every answer is stored at once in
the on-disk cache (`cache`), keyed by the request: a rerun after a failure sends only what is
missing, and the cache hit rate is reported.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Literal, Protocol

from rlhf.config import ConfigError, NonNegativeInt, Positive, PositiveInt
from rlhf.constitution import Constitution, Principle, load_constitution
from tqdm.auto import tqdm

from rlhf.data import Content, as_text, reply_text

log = logging.getLogger(__name__)

PAIR_CHOICES = ("A", "B")
RATE_CHOICES = tuple("1234567")
LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"

PAIR_TEMPLATE = """Judge two responses to a conversation by {these}:
{principles}

Conversation:
{conversation}

Response A:
{a}

Response B:
{b}

Which response follows {these} better? Answer with the letter A or B only."""

RANK_TEMPLATE = """Judge {k} responses to a conversation by {these}:
{principles}

Conversation:
{conversation}

{responses}

Order the responses from best to worst by {these}. Answer with their letters only, best first, separated by ">" (for example: {example})."""

RATE_TEMPLATE = """Judge a response to a conversation by {these}:
{principles}

Conversation:
{conversation}

Response:
{response}

How well does the response follow {these}, from 1 (not at all) to 7 (fully)? Answer with one digit only."""

# Constitutional critique and revision (Bai et al. 2022, the supervised stage): `rlhf cai`.
CRITIQUE_TEMPLATE = """Critique a response to a conversation by this principle:
- {name}: {text}

Conversation:
{conversation}

Response:
{response}

Say in one sentence what in the response goes against the principle, or answer "No problem." if nothing does."""

REVISION_TEMPLATE = """Rewrite a response to a conversation so that it follows this principle:
- {name}: {text}

Conversation:
{conversation}

Response:
{response}

Critique:
{critique}

Answer with the rewritten response only."""

NO_PROBLEM = "No problem."


class JudgeError(RuntimeError):
    """The judge endpoint cannot be used: down, too slow, rate-limited past the retries, or answering garbage."""


@dataclass
class JudgeConfig:
    backend: Literal["http", "local"] = "http"
    """http: an OpenAI-compatible chat endpoint at base_url; local: the Hugging Face model `model` in this process."""
    base_url: str = "http://127.0.0.1:8000/v1"
    """The endpoint's base URL (…/v1); POSTs go to {base_url}/chat/completions."""
    model: str = ""
    """The model name the endpoint serves (http), or a local model directory or hub id (local)."""
    api_key_env: str = "OPENAI_API_KEY"
    """The environment variable holding the endpoint's API key (sent as a Bearer token when set); the key itself never goes in a recipe."""
    constitution: str = ""
    """The constitution file (YAML or Markdown) whose principles the judge applies."""
    principles: Literal["all", "each"] = "all"
    """all: one question quoting every principle; each: one question per principle, combined by their weights."""
    both_orders: bool = True
    """Judge pairs and rankings in both orders and average them, so that position bias cancels."""
    logprobs: Literal["auto", "on", "off"] = "auto"
    """Read the answer tokens' probabilities: auto (ask for them, and parse the text where the endpoint refuses or sends none), on (required), off (always parse the text)."""
    max_tokens: PositiveInt = 16
    """Tokens the judge may answer with."""
    concurrency: PositiveInt = 4
    """Requests in flight at once (http)."""
    retries: NonNegativeInt = 4
    """Retries of a request that failed, timed out or was rate-limited, with exponential backoff."""
    backoff: Positive = 1.0
    """Seconds before the first retry; doubled at each next one (a 429's Retry-After wins)."""
    timeout: Positive = 60.0
    """Seconds a request may take."""
    cache: str = ""
    """The on-disk cache of answers (JSONL), keyed by request; empty: no cache."""
    batch_size: PositiveInt = 8
    """Questions per forward pass (local)."""

    @property
    def labeler(self) -> str:
        return f"ai:{Path(self.model).name if self.backend == 'local' else self.model}"


def check_judge(config: JudgeConfig, key: str = "judge") -> Constitution:
    """Refuse, before anything is sent, a judge the recipe shows cannot work; returns its constitution."""
    if not config.model:
        raise ConfigError(f"{key}.model is required: the served model's name (http) or a model directory (local)")
    if config.backend == "http" and not re.match(r"^https?://", config.base_url):
        raise ConfigError(f"{key}.base_url: expected an http:// or https:// URL, got {config.base_url!r}")
    if not config.constitution:
        raise ConfigError(f"{key}.constitution is required: a YAML or Markdown file of principles (the demo's: rlhf/demo/constitution.yaml)")
    if not Path(config.constitution).is_file():
        raise ConfigError(f"{key}.constitution: {config.constitution} is not a file")
    if config.backend == "local":
        from rlhf.models import check_model_path

        check_model_path(f"{key}.model", config.model)
    return load_constitution(config.constitution)


# ---------------------------------------------------------------- questions and answers

@dataclass
class Query:
    messages: list[dict]
    choices: tuple[str, ...] | None = None
    """The single-token answers whose probabilities are read; None: a free-text answer."""


@dataclass
class Reply:
    text: str
    probs: dict[str, float] | None = None
    """P(choice), renormalised over the choices, when the judge gave token probabilities."""
    cut: bool = False
    """The answer stopped at judge.max_tokens, not at its end (OpenAI's finish_reason "length")."""


def _principles_text(principles: list[Principle]) -> tuple[str, str]:
    these = "this principle" if len(principles) == 1 else "these principles"
    return these, "\n".join(f"- {p.name}: {p.text}" for p in principles)


def _conversation(prompt: Content) -> str:
    text = as_text(prompt).rstrip()
    return text[: -len("Assistant:")].rstrip() if text.endswith("Assistant:") else text


def pair_query(prompt: Content, a: Content, b: Content, principles: list[Principle]) -> Query:
    these, listed = _principles_text(principles)
    text = PAIR_TEMPLATE.format(these=these, principles=listed, conversation=_conversation(prompt), a=reply_text(a).strip(), b=reply_text(b).strip())
    return Query([{"role": "user", "content": text}], PAIR_CHOICES)


def rank_query(prompt: Content, completions: list[Content], principles: list[Principle]) -> Query:
    these, listed = _principles_text(principles)
    k = len(completions)
    responses = "\n\n".join(f"Response {LETTERS[i]}:\n{reply_text(c).strip()}" for i, c in enumerate(completions))
    example = " > ".join(LETTERS[i] for i in [1, 0, *range(2, k)])
    text = RANK_TEMPLATE.format(k=k, these=these, principles=listed, conversation=_conversation(prompt), responses=responses, example=example)
    return Query([{"role": "user", "content": text}], None)


def rate_query(prompt: Content, completion: Content, principles: list[Principle]) -> Query:
    these, listed = _principles_text(principles)
    text = RATE_TEMPLATE.format(these=these, principles=listed, conversation=_conversation(prompt), response=reply_text(completion).strip())
    return Query([{"role": "user", "content": text}], RATE_CHOICES)


def critique_query(prompt: Content, response: Content, principle: Principle) -> Query:
    text = CRITIQUE_TEMPLATE.format(name=principle.name, text=principle.text, conversation=_conversation(prompt), response=reply_text(response).strip())
    return Query([{"role": "user", "content": text}], None)


def revision_query(prompt: Content, response: Content, principle: Principle, critique: str) -> Query:
    text = REVISION_TEMPLATE.format(
        name=principle.name, text=principle.text, conversation=_conversation(prompt), response=reply_text(response).strip(), critique=critique.strip()
    )
    return Query([{"role": "user", "content": text}], None)


def choice_probs(reply: Reply, choices: tuple[str, ...]) -> dict[str, float] | None:
    """P(choice) from the reply's token probabilities, else one-hot on the choice its text names,
    else None (unparseable: no choice named, or more than one)."""
    if reply.probs and sum(reply.probs.get(c, 0.0) for c in choices) > 0:
        total = sum(reply.probs.get(c, 0.0) for c in choices)
        return {c: reply.probs.get(c, 0.0) / total for c in choices}
    choice = parse_choice(reply.text, choices)
    return None if choice is None else {c: float(c == choice) for c in choices}


def parse_choice(text: str, choices: tuple[str, ...]) -> str | None:
    """The one choice a free-text answer names: its first word ("B", "B.", "**B**"), or a phrase
    such as "Response B" / "answer is B", or the only choice that stands alone in it."""
    text = text.strip()
    alternatives = "|".join(re.escape(c) for c in choices)
    first = re.match(rf"^[\W_]*({alternatives})(?![\w])", text)
    if first:
        return first.group(1)
    named = set(re.findall(rf"(?:response|answer|option|choice|rating|score)(?: is)?\W{{0,3}}({alternatives})(?![\w])", text, re.IGNORECASE))
    named &= set(choices)
    if len(named) == 1:
        return named.pop()
    alone = set(re.findall(rf"(?<![\w])({alternatives})(?![\w])", text))
    return alone.pop() if len(alone) == 1 else None


def parse_order(text: str, k: int) -> list[int] | None:
    """The ranking a free-text answer gives ("B > A > C"): the indices best first, or None unless
    it names every one of the k letters exactly once (the last one may be left out)."""
    letters = re.findall(rf"(?<![A-Za-z])([{LETTERS[:k]}])(?![A-Za-z])", text)
    if len(set(letters)) != len(letters):
        return None
    order = [LETTERS.index(x) for x in letters]
    if len(order) == k - 1:
        order.append(next(i for i in range(k) if i not in order))
    return order if len(order) == k else None


# ---------------------------------------------------------------- the cache

class JudgeCache:
    """Answers on disk, one JSON line per request, appended the moment they arrive.

    The key is a hash of what was asked (model, messages, answer length, whether log-probs were
    asked for), so that a changed template or model asks again. A line cut short by a crash is
    skipped when the file is read."""

    def __init__(self, path: str | Path | None):
        self.path = Path(path) if path else None
        self.entries: dict[str, Reply] = {}
        self.hits = self.misses = 0
        self.lock = threading.Lock()
        if self.path and self.path.is_file():
            for line in self.path.read_text(encoding="utf-8").splitlines():
                try:
                    entry = json.loads(line)
                    self.entries[entry["key"]] = Reply(entry["text"], entry.get("probs"), bool(entry.get("cut", False)))
                except (ValueError, KeyError, TypeError):
                    continue

    @staticmethod
    def key(model: str, query: Query, settings: dict) -> str:
        blob = json.dumps({"model": model, "messages": query.messages, "choices": query.choices, **settings}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()

    def get(self, key: str) -> Reply | None:
        with self.lock:
            reply = self.entries.get(key)
            if reply is None:
                self.misses += 1
            else:
                self.hits += 1
            return reply

    def put(self, key: str, reply: Reply) -> None:
        with self.lock:
            self.entries[key] = reply
            if self.path:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                with self.path.open("a", encoding="utf-8") as f:
                    f.write(json.dumps({"key": key, "text": reply.text, "probs": reply.probs} | ({"cut": True} if reply.cut else {})) + "\n")
                    f.flush()
                    os.fsync(f.fileno())

    @property
    def hit_rate(self) -> float | None:
        asked = self.hits + self.misses
        return self.hits / asked if asked else None


# ---------------------------------------------------------------- backends

class Backend(Protocol):
    name: str

    def settings(self) -> dict:
        """What, beside the question, decides the answer (part of the cache key)."""

    def answer(self, queries: list[Query], done: Callable[[int, Reply], None]) -> None:
        """Answer every query, calling done(i, reply) as each arrives; a JudgeError when one cannot be had."""


class OpenAIBackend:
    """An OpenAI-compatible /chat/completions endpoint, greedy (temperature 0)."""

    def __init__(self, config: JudgeConfig):
        import httpx

        self.config, self.name = config, config.model
        self.url = config.base_url.rstrip("/") + "/chat/completions"
        key = os.environ.get(config.api_key_env, "") if config.api_key_env else ""
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        self.client = httpx.Client(timeout=config.timeout, headers=headers)
        self.use_logprobs = config.logprobs != "off"
        self.probed = config.logprobs != "auto"  # auto: whether log-probs are served is not known yet
        self.lock = threading.Lock()

    def settings(self) -> dict:
        return {"max_tokens": self.config.max_tokens, "logprobs": self.config.logprobs}  # the setting: what was served is found out on the way

    def answer(self, queries: list[Query], done: Callable[[int, Reply], None]) -> None:
        if not queries:
            return
        if not self.probed:
            done(0, self.ask(queries[0]))  # the first answer tells whether log-probs are served
            self.probed = True
            queries = [None, *queries[1:]]
        failure = None
        with ThreadPoolExecutor(self.config.concurrency) as pool:
            futures = {pool.submit(self.ask, q): i for i, q in enumerate(queries) if q is not None}
            for future in as_completed(futures):
                if future.cancelled():
                    continue
                try:
                    done(futures[future], future.result())
                except JudgeError as exc:
                    failure = failure or exc
                    for other in futures:
                        other.cancel()
        if failure:
            raise failure

    def ask(self, query: Query) -> Reply:
        body = {"model": self.config.model, "messages": query.messages, "max_tokens": self.config.max_tokens, "temperature": 0.0}
        if self.use_logprobs and query.choices:
            body |= {"logprobs": True, "top_logprobs": min(20, max(5, len(query.choices) + 3))}
        data = self.post(body, query)
        return self.reply(data, query)

    def post(self, body: dict, query: Query) -> dict:
        import httpx

        problem = ""
        for attempt in range(self.config.retries + 1):
            wait = self.config.backoff * 2**attempt
            try:
                response = self.client.post(self.url, json=body)
            except httpx.TimeoutException:
                problem = f"no answer within the timeout of {self.config.timeout:g} s"
            except httpx.TransportError as exc:
                problem = f"cannot connect ({type(exc).__name__}: {exc}); is the server running?"
            else:
                status, excerpt = response.status_code, response.text[:300].replace("\n", " ")
                if status == 429 or status >= 500:
                    problem = f"HTTP {status}{' (rate-limited)' if status == 429 else ''}: {excerpt}"
                    retry_after = response.headers.get("retry-after", "")
                    if retry_after.replace(".", "", 1).isdigit():
                        wait = float(retry_after)
                elif status >= 400:
                    if "logprobs" in body and self.config.logprobs == "auto" and "logprob" in excerpt.lower():
                        with self.lock:
                            if self.use_logprobs:
                                log.warning("%s refuses log-probs (HTTP %d); the judge's answers are read from their text", self.url, status)
                            self.use_logprobs = False
                        return self.post({k: v for k, v in body.items() if k not in ("logprobs", "top_logprobs")}, query)
                    raise JudgeError(f"judge endpoint {self.url} refused the request with HTTP {status}: {excerpt}")
                else:
                    try:
                        data = response.json()
                        content = data["choices"][0]["message"]["content"]
                        if not isinstance(content, str):
                            raise TypeError("content is not a string")
                        return data
                    except (ValueError, KeyError, IndexError, TypeError) as exc:
                        problem = f"the answer is not an OpenAI chat completion ({type(exc).__name__}: {exc}): {excerpt!r}"
            if attempt < self.config.retries:
                log.debug("judge request failed (%s); retry %d in %.1f s", problem, attempt + 1, wait)
                time.sleep(wait)
        raise JudgeError(f"judge endpoint {self.url}: {problem} (tried {self.config.retries + 1} times)")

    def reply(self, data: dict, query: Query) -> Reply:
        choice = data["choices"][0]
        text = choice["message"]["content"]
        probs = None
        content = ((choice.get("logprobs") or {}).get("content") or [])
        if query.choices and content:
            probs = top_logprob_choices(content[0].get("top_logprobs") or [], query.choices)
        elif query.choices and self.use_logprobs:
            if self.config.logprobs == "on":
                raise JudgeError(f"judge endpoint {self.url} sent no log-probs, and judge.logprobs is on (set it to auto to read the answers' text)")
            with self.lock:
                if self.use_logprobs:
                    log.warning("%s sends no log-probs; the judge's answers are read from their text", self.url)
                self.use_logprobs = False
        return Reply(text, probs, choice.get("finish_reason") == "length")


def top_logprob_choices(top: list[dict], choices: tuple[str, ...]) -> dict[str, float] | None:
    """P(choice) from an OpenAI `top_logprobs` list of the first answer token, " A" and "A"
    counted as one; None when no choice is among them."""
    probs = {c: 0.0 for c in choices}
    for entry in top:
        token = str(entry.get("token", "")).strip().strip("*").strip()
        if token in probs:
            probs[token] += math.exp(float(entry["logprob"]))
    return probs if sum(probs.values()) > 0 else None


class LocalBackend:
    """A causal LM in this process: greedy answers, and the choices' probabilities read from the
    logits of the first answer token (every single-token spelling of a choice, " A" and "A")."""

    def __init__(self, config: JudgeConfig, device=None):
        import torch

        from rlhf.models import load_causal_lm, load_tokenizer

        self.config, self.name = config, config.model
        self.device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.tokenizer = load_tokenizer(config.model)
        self.model = load_causal_lm(config.model, self.tokenizer).to(self.device).eval()
        self.spellings: dict[tuple[str, ...], dict[str, list[int]]] = {}

    def settings(self) -> dict:
        return {"max_tokens": self.config.max_tokens, "logprobs": True}

    def _choice_ids(self, choices: tuple[str, ...]) -> dict[str, list[int]]:
        if choices not in self.spellings:
            ids = {}
            for c in choices:
                spelled = {tuple(self.tokenizer(s, add_special_tokens=False)["input_ids"]) for s in (c, " " + c)}
                ids[c] = sorted({t[0] for t in spelled if len(t) == 1})
            self.spellings[choices] = ids
        return self.spellings[choices]

    def answer(self, queries: list[Query], done: Callable[[int, Reply], None]) -> None:
        import torch

        from rlhf.encoding import pad, render_prompt
        from rlhf.models import context_length, stop_token_ids

        stops = stop_token_ids(self.tokenizer, self.model)
        room = context_length(self.model.config) - self.config.max_tokens
        for start in range(0, len(queries), self.config.batch_size):
            batch = queries[start : start + self.config.batch_size]
            prompts = [render_prompt(self.tokenizer, q.messages) for q in batch]
            if max(map(len, prompts)) > room:
                raise ConfigError(
                    f"a judge question is {max(map(len, prompts))} tokens, more than {self.config.model} can read before its answer "
                    f"({context_length(self.model.config)} positions less judge.max_tokens {self.config.max_tokens})"
                )
            ids, mask = pad(prompts, self.tokenizer.pad_token_id, side="left")
            with torch.no_grad():
                out = self.model.generate(
                    input_ids=ids.to(self.device), attention_mask=mask.to(self.device), max_new_tokens=self.config.max_tokens,
                    do_sample=False, output_scores=True, return_dict_in_generate=True, pad_token_id=self.tokenizer.pad_token_id,
                    eos_token_id=stops,
                )
            first = torch.log_softmax(out.scores[0].float(), dim=-1)
            for row, q in enumerate(batch):
                generated = out.sequences[row, ids.shape[1] :].tolist()
                cut = len(generated) == self.config.max_tokens and not any(t in stops for t in generated)
                tokens = [t for t in generated if t not in stops and t != self.tokenizer.pad_token_id]
                probs = None
                if q.choices:
                    spelled = self._choice_ids(q.choices)
                    probs = {c: float(first[row, spelled[c]].exp().sum()) if spelled[c] else 0.0 for c in q.choices}
                done(start + row, Reply(self.tokenizer.decode(tokens, skip_special_tokens=True), probs, cut))


class Judge:
    """A backend behind the cache: `ask` returns one reply per query, from the cache where it can."""

    def __init__(self, config: JudgeConfig, backend: Backend | None = None, progress: bool = True):
        self.config, self.progress = config, progress
        self.backend = backend or (LocalBackend(config) if config.backend == "local" else OpenAIBackend(config))
        self.cache = JudgeCache(config.cache or None)

    def ask(self, queries: list[Query]) -> list[Reply]:
        replies: list[Reply | None] = [None] * len(queries)
        keys = [JudgeCache.key(self.backend.name, q, self.backend.settings()) for q in queries]
        missing = []
        for i, key in enumerate(keys):
            replies[i] = self.cache.get(key)
            if replies[i] is None:
                missing.append(i)

        progress = tqdm(total=len(missing), desc="judging", dynamic_ncols=True, disable=len(missing) < 2 or not self.progress)

        def done(j: int, reply: Reply) -> None:
            i = missing[j]
            replies[i] = reply
            self.cache.put(keys[i], reply)
            progress.update(1)

        try:
            self.backend.answer([queries[i] for i in missing], done)
        except JudgeError as exc:
            answered = len(queries) - sum(r is None for r in replies)
            where = f"; they are kept in the cache {self.config.cache}: run again to resume from there" if self.config.cache else " (set judge.cache to keep answers across runs)"
            raise JudgeError(f"{exc}. {answered} of {len(queries)} questions were answered{where}") from None
        finally:
            progress.close()
        return replies  # type: ignore[return-value]


# ---------------------------------------------------------------- verdicts

@dataclass
class Verdict:
    """One pair, ranking or rating judged: `value` is P(first better) for a pair, the indices best
    first for a ranking, the rating (1-7) for a rating; None when every answer was unparseable."""

    value: float | list[int] | None
    confidence: float | None = None
    principle: str = ""
    by_principle: dict[str, float | list[int]] = field(default_factory=dict)
    consistent: bool | None = None
    """Both orders agreed (pairs, rankings judged in both orders); None: not judged in both."""
    unparseable: int = 0


def _groups(constitution: Constitution, kind: str | None, mode: str) -> list[list[Principle]]:
    principles = constitution.principles if kind is None else constitution.for_kind(kind) or constitution.principles
    return [principles] if mode == "all" else [[p] for p in principles]


def _group_name(group: list[Principle]) -> str:
    return group[0].name if len(group) == 1 else "all"


def _weight(group: list[Principle]) -> float:
    return group[0].weight if len(group) == 1 else 1.0


def judge_pairs(judge: Judge, constitution: Constitution, pairs: list[tuple[Content, Content, Content, str | None]]) -> list[Verdict]:
    """(prompt, a, b, kind) each -> a Verdict whose value is P(a is better than b)."""
    config = judge.config
    plan, queries = [], []
    for prompt, a, b, kind in pairs:
        entries = []
        for group in _groups(constitution, kind, config.principles):
            forward = len(queries)
            queries.append(pair_query(prompt, a, b, group))
            backward = None
            if config.both_orders:
                backward = len(queries)
                queries.append(pair_query(prompt, b, a, group))
            entries.append((group, forward, backward))
        plan.append(entries)
    replies = judge.ask(queries)
    verdicts = []
    for entries in plan:
        by, weights, unparseable, consistent = {}, {}, 0, []
        for group, forward, backward in entries:
            first = choice_probs(replies[forward], PAIR_CHOICES)
            second = choice_probs(replies[backward], PAIR_CHOICES) if backward is not None else None
            unparseable += (first is None) + (backward is not None and second is None)
            if first is None or (backward is not None and second is None):
                continue
            p = first["A"] if second is None else (first["A"] + second["B"]) / 2
            if second is not None and first["A"] != 0.5 and second["B"] != 0.5:
                consistent.append((first["A"] > 0.5) == (second["B"] > 0.5))
            by[_group_name(group)], weights[_group_name(group)] = p, _weight(group)
        if not by:
            verdicts.append(Verdict(None, unparseable=unparseable))
            continue
        p = sum(by[n] * weights[n] for n in by) / sum(weights.values())
        decisive = max(by, key=lambda n: weights[n] * abs(by[n] - 0.5))
        verdicts.append(Verdict(p, max(p, 1 - p), decisive, by, all(consistent) if consistent else None, unparseable))
    return verdicts


def judge_rankings(judge: Judge, constitution: Constitution, items: list[tuple[Content, list[Content], str | None]]) -> list[Verdict]:
    """(prompt, completions, kind) each -> a Verdict whose value is the indices best first: the
    mean rank over the orders asked (and over the principles, by weight)."""
    config = judge.config
    plan, queries = [], []
    for prompt, completions, kind in items:
        entries = []
        for group in _groups(constitution, kind, config.principles):
            forward = len(queries)
            queries.append(rank_query(prompt, completions, group))
            backward = None
            if config.both_orders:
                backward = len(queries)
                queries.append(rank_query(prompt, completions[::-1], group))
            entries.append((group, forward, backward))
        plan.append((len(completions), entries))
    replies = judge.ask(queries)
    verdicts = []
    for k, entries in plan:
        ranks, by, unparseable, consistent, agreement = [0.0] * k, {}, 0, [], []
        weight_total = 0.0
        for group, forward, backward in entries:
            first = parse_order(replies[forward].text, k)
            second = parse_order(replies[backward].text, k) if backward is not None else None
            unparseable += (first is None) + (backward is not None and second is None)
            if first is None or (backward is not None and second is None):
                continue
            orders = [first] + ([[k - 1 - i for i in second]] if second is not None else [])
            mean_rank = [sum(order.index(i) for order in orders) / len(orders) for i in range(k)]
            if second is not None:
                consistent.append(orders[0] == orders[1])
                agreement.append((1 + kendall_tau(orders[0], orders[1])) / 2)
            w = _weight(group)
            ranks = [r + w * m for r, m in zip(ranks, mean_rank)]
            weight_total += w
            by[_group_name(group)] = sorted(range(k), key=lambda i: (mean_rank[i], i))
        if not by:
            verdicts.append(Verdict(None, unparseable=unparseable))
            continue
        order = sorted(range(k), key=lambda i: (ranks[i], i))
        confidence = sum(agreement) / len(agreement) if agreement else None
        name = next(iter(by)) if len(by) == 1 else "all"
        verdicts.append(Verdict(order, confidence, name, by, all(consistent) if consistent else None, unparseable))
    return verdicts


def kendall_tau(first: list[int], second: list[int]) -> float:
    """Kendall's tau between two orders of the same items (1: the same, -1: reversed)."""
    k = len(first)
    if k < 2:
        return 1.0
    where = {item: i for i, item in enumerate(second)}
    concordant = sum(1 if where[first[i]] < where[first[j]] else -1 for i in range(k) for j in range(i + 1, k))
    return concordant / (k * (k - 1) / 2)


def judge_ratings(judge: Judge, constitution: Constitution, items: list[tuple[Content, Content, str | None]]) -> list[Verdict]:
    """(prompt, completion, kind) each -> a Verdict whose value is the rating, 1 to 7: the
    expected value under the answer's probabilities (or the digit its text gives), averaged over
    the principles by weight. Its confidence is the probability of the likeliest digit."""
    plan, queries = [], []
    for prompt, completion, kind in items:
        entries = []
        for group in _groups(constitution, kind, judge.config.principles):
            entries.append((group, len(queries)))
            queries.append(rate_query(prompt, completion, group))
        plan.append(entries)
    replies = judge.ask(queries)
    verdicts = []
    for entries in plan:
        by, weights, unparseable, peaks = {}, {}, 0, []
        for group, index in entries:
            probs = choice_probs(replies[index], RATE_CHOICES)
            if probs is None:
                unparseable += 1
                continue
            by[_group_name(group)] = sum(int(c) * p for c, p in probs.items())
            weights[_group_name(group)] = _weight(group)
            if replies[index].probs:
                peaks.append(max(probs.values()))
        if not by:
            verdicts.append(Verdict(None, unparseable=unparseable))
            continue
        rating = sum(by[n] * weights[n] for n in by) / sum(weights.values())
        name = next(iter(by)) if len(by) == 1 else "all"
        verdicts.append(Verdict(rating, min(peaks) if peaks else None, name, by, None, unparseable))
    return verdicts


# ---------------------------------------------------------------- rlhf judge: a candidates file to labels

TASKS = ("pair", "rank", "rate")


def label_candidates(
    config: JudgeConfig, candidates: list[str], out: str | Path, task: str = "pair", min_confidence: float = 0.0, judge: Judge | None = None
) -> dict:
    """Label the candidates files (`rlhf generate`'s) into preference JSONL, as the labeling app
    exports it, with `labeler: "ai:<model>"`, the confidence and the principle that decided.

    pair: every two distinct candidates of a prompt; rank: all of a prompt's distinct candidates;
    rate: each candidate. A label below `min_confidence` is left out (a rating without
    probabilities has no confidence and is kept), and so is a tie or an unparseable answer; all
    are counted. Writes `out` and, beside it, `<out>.judge.json`: the counts, the position-bias
    rate and the cache hit rate. Returns that summary."""
    from rlhf.data import load_candidates, write_jsonl

    if task not in TASKS:
        raise ConfigError(f"--task: {task!r} is not one of {', '.join(TASKS)}")
    constitution = check_judge(config)
    items = load_candidates(candidates)
    judge = judge or Judge(config)
    counts: Counter = Counter()
    records: list[dict] = []
    labeler = config.labeler
    base = {"labeler": labeler}
    if task == "pair":
        pairs = []
        for item in items:
            texts = _distinct([c.completion for c in item.candidates], counts)
            pairs += [(item.prompt, texts[i], texts[j], item.kind) for i in range(len(texts)) for j in range(i + 1, len(texts))]
        for (prompt, a, b, _), v in zip(pairs, judge_pairs(judge, constitution, pairs)):
            counts["unparseable answers"] += v.unparseable
            if _kept(v, min_confidence, counts) and v.value != 0.5:
                chosen, rejected = (a, b) if v.value > 0.5 else (b, a)
                flip = (lambda p: p) if v.value > 0.5 else (lambda p: 1 - p)
                records.append({"prompt": prompt, "chosen": chosen, "rejected": rejected, **base, "confidence": round(v.confidence, 4),
                                "principle": v.principle, "principles": {n: round(flip(p), 4) for n, p in v.by_principle.items()},
                                "position_consistent": v.consistent})
            elif v.value == 0.5:
                counts["ties"] += 1
            counts["position-inconsistent"] += v.consistent is False
            counts["judged in both orders"] += v.consistent is not None
        counts["pairs"] = len(pairs)
    elif task == "rank":
        ranked = []
        for item in items:
            texts = _distinct([c.completion for c in item.candidates], counts)
            if len(texts) >= 2:
                ranked.append((item.prompt, texts, item.kind))
        for (prompt, texts, _), v in zip(ranked, judge_rankings(judge, constitution, ranked)):
            counts["unparseable answers"] += v.unparseable
            if _kept(v, min_confidence, counts):
                records.append({"prompt": prompt, "completions": [texts[i] for i in v.value], **base,
                                "confidence": None if v.confidence is None else round(v.confidence, 4), "principle": v.principle,
                                "principles": {n: [texts[i] for i in order] for n, order in v.by_principle.items()},
                                "position_consistent": v.consistent})
            counts["position-inconsistent"] += v.consistent is False
            counts["judged in both orders"] += v.consistent is not None
        counts["rankings"] = len(ranked)
    else:
        rated = [(item.prompt, c.completion, item.kind) for item in items for c in item.candidates]
        for (prompt, completion, _), v in zip(rated, judge_ratings(judge, constitution, rated)):
            counts["unparseable answers"] += v.unparseable
            if _kept(v, min_confidence, counts):
                records.append({"prompt": prompt, "completion": completion, "label": round(v.value, 4), **base,
                                "confidence": None if v.confidence is None else round(v.confidence, 4), "principle": v.principle,
                                "principles": {n: round(r, 4) for n, r in v.by_principle.items()}})
        counts["ratings"] = len(rated)
    write_jsonl(out, records)
    both = counts["judged in both orders"]
    summary = {
        "task": task, "labeler": labeler, "labels": len(records), **{k: v for k, v in sorted(counts.items())},
        "position_bias_rate": counts["position-inconsistent"] / both if both else None,
        "cache_hits": judge.cache.hits, "cache_misses": judge.cache.misses, "cache_hit_rate": judge.cache.hit_rate,
        "min_confidence": min_confidence, "constitution": constitution.source, "principles": config.principles,
    }
    Path(str(out) + ".judge.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    return summary


def _distinct(texts: list[str], counts: Counter) -> list[str]:
    kept = list(dict.fromkeys(texts))
    counts["repeated candidates"] += len(texts) - len(kept)
    return kept


def _kept(verdict: Verdict, min_confidence: float, counts: Counter) -> bool:
    if verdict.value is None:
        counts["unparseable items"] += 1
        return False
    if verdict.confidence is not None and verdict.confidence < min_confidence:
        counts["below min_confidence"] += 1
        return False
    return True
