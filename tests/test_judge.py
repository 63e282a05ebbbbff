"""The AI judge: constitutions, reading an answer, both orders, and its HTTP client against a real
endpoint on 127.0.0.1 that fails on demand (down, slow, 429, garbage)."""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest

from judge_server import Endpoint
from rlhf.constitution import load_constitution
from rlhf.data import DataError
from rlhf.judge import (
    Judge, JudgeConfig, JudgeError, Reply, choice_probs, judge_pairs, kendall_tau, label_candidates, parse_choice, parse_order,
    top_logprob_choices,
)

CONSTITUTION = Path(__file__).parent.parent / "rlhf" / "demo" / "constitution.yaml"
PROMPT = "User: How do I reset my password?\nAssistant:"
# Lengths 10, 31 and 52 characters: the test endpoint's judge prefers the shorter.
SHORT, MIDDLE, LONG = " Go to Settings.", " Open Settings, then click Reset.", " Open Settings, click Reset, then check your inbox."


# ---------------------------------------------------------------- constitutions

def test_constitution_yaml_and_markdown_read_alike(tmp_path):
    yaml_file = tmp_path / "c.yaml"
    yaml_file.write_text("principles:\n  - name: kind\n    text: Be kind.\n    weight: 2\n  - name: safe\n    text: Refuse harm.\n    applies_to: [harmful]\n")
    md_file = tmp_path / "c.md"
    md_file.write_text("# Our constitution\n\nIntro text.\n\n## kind\nweight: 2\n\nBe kind.\n\n## safe\napplies to: harmful\n\nRefuse harm.\n")
    for path in (yaml_file, md_file):
        c = load_constitution(path)
        assert [(p.name, p.text, p.weight, p.applies_to) for p in c.principles] == [("kind", "Be kind.", 2.0, []), ("safe", "Refuse harm.", 1.0, ["harmful"])]
        assert [p.name for p in c.for_kind("harmful")] == ["kind", "safe"]
        assert [p.name for p in c.for_kind("question")] == ["kind"]


@pytest.mark.parametrize("text,where,field", [
    ("principles:\n  - name: kind\n    text: Be kind.\n  - name: safe\n    weight: -1\n    text: x\n", ":4", "weight"),
    ("principles:\n  - name: kind\n    txt: Be kind.\n", ":2", "txt"),
    ("principles:\n  - name: kind\n", ":2", "text"),
])
def test_constitution_errors_name_line_and_field(tmp_path, text, where, field):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(DataError) as error:
        load_constitution(path)
    assert error.value.where == f"{path}{where}" and error.value.field == field


def test_markdown_weight_error_names_its_line(tmp_path):
    path = tmp_path / "bad.md"
    path.write_text("## kind\nweight: lots\n\nBe kind.\n")
    with pytest.raises(DataError, match=r"bad.md:2: field 'weight'"):
        load_constitution(path)


# ---------------------------------------------------------------- reading answers

@pytest.mark.parametrize("text,expected", [
    ("A", "A"), (" B.", "B"), ("**B**", "B"), ("Response A is better.", "A"), ("The answer is B", "B"),
    ("I prefer B because A is rude", None), ("Both are fine", None), ("", None), ("Answer: 5", None),
])
def test_parse_choice_never_guesses(text, expected):
    assert parse_choice(text, ("A", "B")) == expected


def test_parse_order():
    assert parse_order("B > A > C", 3) == [1, 0, 2]
    assert parse_order("C, A", 3) == [2, 0, 1]  # the last one left out
    assert parse_order("A > A > B", 3) is None
    assert parse_order("no idea", 3) is None


def test_probabilities_read_from_top_logprobs():
    top = [{"token": " A", "logprob": math.log(0.6)}, {"token": "A", "logprob": math.log(0.1)}, {"token": " B", "logprob": math.log(0.1)}, {"token": "The", "logprob": math.log(0.2)}]
    probs = top_logprob_choices(top, ("A", "B"))
    assert probs == pytest.approx({"A": 0.7, "B": 0.1})
    assert choice_probs(Reply("B", probs), ("A", "B")) == pytest.approx({"A": 0.875, "B": 0.125})  # probabilities win over the text
    assert choice_probs(Reply("B", None), ("A", "B")) == {"A": 0.0, "B": 1.0}
    assert top_logprob_choices([{"token": "The", "logprob": -0.1}], ("A", "B")) is None


def test_kendall_tau():
    assert kendall_tau([0, 1, 2], [0, 1, 2]) == 1.0
    assert kendall_tau([0, 1, 2], [2, 1, 0]) == -1.0
    assert kendall_tau([0, 1, 2], [1, 0, 2]) == pytest.approx(1 / 3)


class Scripted:
    """A backend that answers a fixed P(A) per (first response, second response) of a pair."""

    name = "scripted"

    def __init__(self, p_first: dict[tuple[str, str], float]):
        self.p_first, self.asked = p_first, 0

    def settings(self):
        return {}

    def answer(self, queries, done):
        for i, q in enumerate(queries):
            self.asked += 1
            a, b = (t.strip() for t in re.findall(r"Response [AB]:\n(.*?)\n\n", q.messages[0]["content"], re.S))
            p = self.p_first[(a, b)]
            done(i, Reply("A" if p > 0.5 else "B", {"A": p, "B": 1 - p}))


def test_both_orders_cancel_position_bias():
    # A judge that likes position A by 0.2 whatever it reads: x over y is 0.9 shown first, 0.5
    # shown second (P(B) there = 0.5) -> mean 0.7; the verdicts agree on x, so no inconsistency.
    judge = Judge(JudgeConfig(model="scripted", constitution=str(CONSTITUTION)), Scripted({("x", "y"): 0.9, ("y", "x"): 0.5}))
    (v,) = judge_pairs(judge, load_constitution(CONSTITUTION), [(PROMPT, "x", "y", None)])
    assert v.value == pytest.approx(0.7) and v.confidence == pytest.approx(0.7) and v.consistent is None  # 0.5 in one order: no side taken
    judge = Judge(JudgeConfig(model="scripted", constitution=str(CONSTITUTION)), Scripted({("x", "y"): 0.8, ("y", "x"): 0.7}))
    (v,) = judge_pairs(judge, load_constitution(CONSTITUTION), [(PROMPT, "x", "y", None)])
    # Shown first, x wins (0.8); shown second, y wins (P(A) = 0.7 for y): the judge follows the position.
    assert v.value == pytest.approx((0.8 + 0.3) / 2) and v.consistent is False


def test_each_principle_weighted(tmp_path):
    c = tmp_path / "c.yaml"
    c.write_text("principles:\n  - {name: one, text: First., weight: 3}\n  - {name: two, text: Second.}\n")

    class ByPrinciple(Scripted):
        def answer(self, queries, done):
            for i, q in enumerate(queries):
                text = q.messages[0]["content"]
                first_is_x = "Response A:\nx" in text
                p_x = 0.9 if "- one:" in text else 0.2  # one prefers x, two prefers y
                p = p_x if first_is_x else 1 - p_x
                done(i, Reply("A", {"A": p, "B": 1 - p}))

    judge = Judge(JudgeConfig(model="s", constitution=str(c), principles="each"), ByPrinciple({}))
    (v,) = judge_pairs(judge, load_constitution(c), [(PROMPT, "x", "y", None)])
    assert v.by_principle == pytest.approx({"one": 0.9, "two": 0.2})
    assert v.value == pytest.approx((3 * 0.9 + 0.2) / 4) and v.principle == "one"


# ---------------------------------------------------------------- over HTTP, with faults

@pytest.fixture
def endpoint():
    server = Endpoint()
    yield server
    server.close()


def candidates_file(tmp_path) -> Path:
    path = tmp_path / "candidates.jsonl"
    rows = [
        {"prompt": PROMPT, "candidates": [{"completion": c, "model": "m", "sampling": {}} for c in (LONG, SHORT, MIDDLE)]},
        {"prompt": "User: Where is my invoice?\nAssistant:", "candidates": [{"completion": c, "model": "m", "sampling": {}} for c in (SHORT, LONG)]},
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def judge_config(url: str, tmp_path, **kw) -> JudgeConfig:
    settings = {"model": "judge-7b", "base_url": url, "constitution": str(CONSTITUTION), "cache": str(tmp_path / "cache.jsonl"),
                "retries": 2, "backoff": 0.01, "timeout": 5.0, "concurrency": 2} | kw
    return JudgeConfig(**settings)


def read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_pairs_over_http_both_orders_from_text(endpoint, tmp_path):
    out = tmp_path / "ai.jsonl"
    summary = label_candidates(judge_config(endpoint.url, tmp_path), [str(candidates_file(tmp_path))], out, "pair")
    records = read(out)
    # 3 pairs of the first prompt and 1 of the second, each asked in both orders.
    assert len(endpoint.requests) == 8 and len(records) == 4
    for r in records:
        assert len(r["chosen"]) < len(r["rejected"]) and r["labeler"] == "ai:judge-7b" and r["confidence"] == 1.0 and r["position_consistent"] is True
    assert summary["position_bias_rate"] == 0.0 and summary["cache_hit_rate"] == 0.0
    assert all(body["temperature"] == 0.0 and body["model"] == "judge-7b" for body in endpoint.requests)


def test_logprobs_read_over_http(endpoint, tmp_path):
    endpoint.default = "logprobs"
    out = tmp_path / "ai.jsonl"
    label_candidates(judge_config(endpoint.url, tmp_path), [str(candidates_file(tmp_path))], out, "pair")
    # Each order: the shorter response's letter at 0.8, the other's at 0.15 -> 0.8 / 0.95 in both.
    assert all(r["confidence"] == pytest.approx(0.8 / 0.95, abs=1e-4) for r in read(out))
    assert all(body.get("logprobs") is True for body in endpoint.requests)


def test_rankings_and_ratings_over_http(endpoint, tmp_path):
    ranks, rates = tmp_path / "rank.jsonl", tmp_path / "rate.jsonl"
    label_candidates(judge_config(endpoint.url, tmp_path), [str(candidates_file(tmp_path))], ranks, "rank")
    first = read(ranks)[0]
    assert first["completions"] == [SHORT, MIDDLE, LONG] and first["position_consistent"] is True and first["confidence"] == 1.0
    label_candidates(judge_config(endpoint.url, tmp_path), [str(candidates_file(tmp_path))], rates, "rate")
    labels = {r["completion"]: r["label"] for r in read(rates)}
    assert labels == {LONG: 7 - len(LONG.strip()) // 20, SHORT: 7 - len(SHORT.strip()) // 20, MIDDLE: 7 - len(MIDDLE.strip()) // 20}


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "rlhf", *args], capture_output=True, text=True, timeout=120)


def cli_args(config: JudgeConfig, tmp_path, out: Path, *extra: str) -> list[str]:
    overrides = [f"judge.{k}={v}" for k, v in vars(config).items() if k in ("model", "base_url", "constitution", "cache", "retries", "backoff", "timeout")]
    return ["judge", "--candidates", str(candidates_file(tmp_path)), "--out", str(out), *extra, *overrides]


def test_endpoint_down_is_a_clear_error_and_writes_nothing(tmp_path):
    with _dead_port() as url:
        out = tmp_path / "ai.jsonl"
        result = run_cli(*cli_args(judge_config(url, tmp_path, retries=1), tmp_path, out))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "cannot connect" in result.stderr and "is the server running?" in result.stderr and "0 of 8 questions were answered" in result.stderr
    assert not out.exists()


class _dead_port:
    """A URL on a port where nothing listens."""

    def __enter__(self):
        import socket

        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        self.port = sock.getsockname()[1]
        sock.close()
        return f"http://127.0.0.1:{self.port}/v1"

    def __exit__(self, *exc):
        return False


def test_slow_endpoint_times_out(endpoint, tmp_path):
    endpoint.default = "slow"
    with pytest.raises(JudgeError, match=r"no answer within the timeout of 0.3 s \(tried 2 times\)"):
        label_candidates(judge_config(endpoint.url, tmp_path, timeout=0.3, retries=1, concurrency=8), [str(candidates_file(tmp_path))], tmp_path / "ai.jsonl")
    assert not (tmp_path / "ai.jsonl").exists()


def test_rate_limit_is_retried_and_loses_nothing(endpoint, tmp_path):
    endpoint.plan = ["429", "429", "500"]
    out = tmp_path / "ai.jsonl"
    label_candidates(judge_config(endpoint.url, tmp_path, retries=3, concurrency=1), [str(candidates_file(tmp_path))], out)
    assert len(endpoint.requests) == 8 + 3 and len(read(out)) == 4


def test_rate_limit_past_the_retries_says_so(endpoint, tmp_path):
    endpoint.default = "429"
    result = run_cli(*cli_args(judge_config(endpoint.url, tmp_path, retries=1), tmp_path, tmp_path / "ai.jsonl"))
    assert result.returncode == 2 and "HTTP 429 (rate-limited)" in result.stderr and "Traceback" not in result.stderr


def test_garbage_is_an_error_not_a_label(endpoint, tmp_path):
    endpoint.default = "garbage"
    with pytest.raises(JudgeError, match="not an OpenAI chat completion"):
        label_candidates(judge_config(endpoint.url, tmp_path, retries=0), [str(candidates_file(tmp_path))], tmp_path / "ai.jsonl")
    assert not (tmp_path / "ai.jsonl").exists()


def test_unparseable_answers_are_counted_never_guessed(endpoint, tmp_path):
    endpoint.plan = ["unsure"]  # the first question of the first pair
    out = tmp_path / "ai.jsonl"
    summary = label_candidates(judge_config(endpoint.url, tmp_path, concurrency=1), [str(candidates_file(tmp_path))], out)
    assert summary["unparseable answers"] == 1 and summary["unparseable items"] == 1 and len(read(out)) == 3


def test_rerun_resumes_from_the_cache(endpoint, tmp_path):
    clean = tmp_path / "clean"
    clean.mkdir()
    label_candidates(judge_config(endpoint.url, clean, concurrency=1), [str(candidates_file(tmp_path))], clean / "ai.jsonl")
    endpoint.requests.clear()
    endpoint.plan = ["ok"] * 5
    endpoint.default = "500"
    out = tmp_path / "ai.jsonl"
    with pytest.raises(JudgeError, match=r"5 of 8 questions were answered; they are kept in the cache"):
        label_candidates(judge_config(endpoint.url, tmp_path, concurrency=1, retries=1), [str(candidates_file(tmp_path))], out)
    endpoint.requests.clear()
    endpoint.default = "ok"
    summary = label_candidates(judge_config(endpoint.url, tmp_path, concurrency=1), [str(candidates_file(tmp_path))], out)
    assert len(endpoint.requests) == 3 and summary["cache_hits"] == 5
    assert read(out) == read(clean / "ai.jsonl")


def test_loop_labels_with_the_judge_and_resumes(endpoint, tmp_path):
    from rlhf.loop import Round, judge_feedback

    rnd = Round(1, tmp_path, "policy", "policy", "")
    items = [{"item": 0, "prompt": PROMPT, "completions": [LONG, SHORT, MIDDLE]}, {"item": 1, "prompt": PROMPT, "completions": [MIDDLE, SHORT]}]
    config = judge_config(endpoint.url, tmp_path, cache="")
    records = judge_feedback(config, rnd, items)
    assert [r["completions"] for r in records] == [[SHORT, MIDDLE, LONG], [SHORT, MIDDLE]]
    assert {r["labeler"] for r in records} == {"ai:judge-7b"} and (tmp_path / "judge_cache.jsonl").is_file()
    asked = len(endpoint.requests)
    assert judge_feedback(config, rnd, items) == records and len(endpoint.requests) == asked  # the round's cache answers


# ---------------------------------------------------------------- reward.kind judge against reference responses

def references_file(tmp_path, rows) -> Path:
    path = tmp_path / "references.jsonl"
    path.write_text("".join(json.dumps({"prompt": p, "completion": c}) + "\n" for p, c in rows))
    return path


def test_reward_against_a_reference_is_the_probability_of_beating_it(endpoint, tmp_path):
    from rlhf.scoring import RewardSourceConfig, load_reward_source

    other = "User: Where is my invoice?\nAssistant:"
    reference = references_file(tmp_path, [(PROMPT, MIDDLE), (other, MIDDLE)])
    config = RewardSourceConfig(kind="judge", judge=judge_config(endpoint.url, tmp_path), reference=str(reference))
    source = load_reward_source(config)
    # This judge prefers the shorter response in both orders: shorter than the reference wins.
    assert source([PROMPT, other, PROMPT], [SHORT, LONG, LONG]).tolist() == [1.0, 0.0, 0.0]
    asked = [body["messages"][-1]["content"] for body in endpoint.requests]
    assert len(asked) == 6 and all(MIDDLE.strip() in text and "Response B:" in text for text in asked)
    assert sum(text.index(MIDDLE.strip()) < text.index("Response B:") for text in asked) == 3  # the reference in each place once


def test_reward_reference_errors_name_the_key_file_and_line(endpoint, tmp_path):
    from rlhf.config import ConfigError
    from rlhf.scoring import RewardSourceConfig, check_reward_source, load_references, load_reward_source

    reference = references_file(tmp_path, [(PROMPT, MIDDLE)])
    source = load_reward_source(RewardSourceConfig(kind="judge", judge=judge_config(endpoint.url, tmp_path), reference=str(reference)))
    with pytest.raises(ConfigError, match=r"reward.reference: .*references.jsonl has no reference response for 1 of 2 prompts, the first of them: 'User: Where is my invoice\?"):
        source([PROMPT, "User: Where is my invoice?\nAssistant:"], [SHORT, SHORT])
    assert endpoint.requests == []  # refused before a question is asked
    twice = references_file(tmp_path, [(PROMPT, MIDDLE), (PROMPT, LONG)])
    with pytest.raises(DataError, match=r"references.jsonl:2.*prompt.*a second, different reference"):
        load_references(str(twice))
    several = tmp_path / "several.jsonl"
    several.write_text(json.dumps({"prompt": [{"role": "user", "content": "hi"}], "completion": [
        {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "and?"}]}) + "\n")
    with pytest.raises(DataError, match=r"several.jsonl:1.*completion\[1\].*one assistant message, got 2"):
        load_references(str(several))
    # rlhf generate --num 1 writes a reference per prompt; more candidates than one are refused
    generated = tmp_path / "generated.jsonl"
    generated.write_text("".join(json.dumps({"prompt": PROMPT, "candidates": [{"completion": c, "model": "sft", "sampling": {}} for c in cs]}) + "\n"
                                 for cs in ([SHORT], [SHORT, LONG])))
    with pytest.raises(DataError, match=r"generated.jsonl:2.*candidates.*one response, got 2 candidates"):
        load_references(str(generated))
    generated.write_text(generated.read_text().splitlines()[0] + "\n")
    assert list(load_references(str(generated)).values()) == [SHORT]
    with pytest.raises(ConfigError, match=r"ppo.reward.reference: only an AI judge"):
        check_reward_source(RewardSourceConfig(kind="model", path="rm", reference=str(reference)), "ppo.reward")


def test_ppo_refuses_prompts_without_a_reference_before_loading_anything(tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"prompt": PROMPT}) + "\n" + json.dumps({"prompt": "User: Where is my invoice?\nAssistant:"}) + "\n")
    reference = references_file(tmp_path, [(PROMPT, MIDDLE)])
    policy = Path(__file__).parent.parent / "rlhf" / "demo" / "judge_model"  # any model directory: nothing is loaded
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(json.dumps({"ppo": {
        "policy": str(policy), "prompts": {"train": [str(prompts)]}, "output_dir": str(tmp_path / "out"),
        "reward": {"kind": "judge", "reference": str(reference), "judge": {"backend": "local", "model": str(policy), "constitution": str(CONSTITUTION)}},
    }}))
    result = run_cli("ppo", "--config", str(recipe))
    assert result.returncode == 2, result.stderr
    assert "ppo.reward.reference:" in result.stderr and "no reference response for 1 of 2 prompts, the first at " in result.stderr
    assert f"{prompts}:2" in result.stderr
    assert "Traceback" not in result.stderr and not (tmp_path / "out").exists()


def test_an_answer_cut_at_max_tokens_is_marked_and_cached_so(endpoint, tmp_path):
    from rlhf.judge import Judge, Query

    endpoint.plan = ["cut", "ok"]
    config = judge_config(endpoint.url, tmp_path, concurrency=1)  # the plan is consumed in the queries' order
    queries = [Query([{"role": "user", "content": f"Rewrite the response.\n\nResponse:\n{text}\n\n"}]) for text in (LONG, SHORT)]
    first = Judge(config, progress=False).ask(queries)
    assert [r.cut for r in first] == [True, False]
    again = Judge(config, progress=False).ask(queries)  # from the cache alone
    assert [r.cut for r in again] == [True, False] and len(endpoint.requests) == 2
