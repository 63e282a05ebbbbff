"""The judge end to end over real HTTP: the demo's judge model served by `transformers serve` (a
server process on 127.0.0.1), `rlhf judge` labelling demo candidates in both orders, `rlhf reward`
training on the labels, and PPO rewarded by the served judge with its answers cached."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

ROOT = Path(__file__).resolve().parent.parent
BASE = ROOT / "rlhf" / "demo" / "base_model"
CONSTITUTION = ROOT / "rlhf" / "demo" / "constitution.yaml"
PROMPTS = [
    "User: How do I reset my password?\nAssistant:",
    "User: Where can I find my invoice?\nAssistant:",
    "User: How long does shipping take?\nAssistant:",
    "User: How do I get a refund?\nAssistant:",
]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def served_judge(tmp_path_factory):
    """The demo's judge model (rlhf/demo/judge_model), served by `transformers serve` in its own process."""
    model = ROOT / "rlhf" / "demo" / "judge_model"
    port = free_port()
    log = tmp_path_factory.mktemp("serve") / "serve.log"
    server = subprocess.Popen(
        [str(Path(sys.executable).parent / "transformers"), "serve", str(model), "--host", "127.0.0.1", "--port", str(port), "--device", "cpu"],
        stdout=log.open("w"), stderr=subprocess.STDOUT, env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    url = f"http://127.0.0.1:{port}/v1"
    try:
        deadline = time.time() + 120
        while True:
            try:
                if httpx.get(f"{url}/models", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if server.poll() is not None or time.time() > deadline:
                raise RuntimeError(f"transformers serve did not start:\n{log.read_text()}")
            time.sleep(0.5)
        yield url, str(model)
    finally:
        server.terminate()
        server.wait(timeout=30)


def rlhf(*args: str) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, "-m", "rlhf", *args], capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def judge_overrides(url: str, model: str, cache: Path, prefix: str = "judge") -> list[str]:
    return [f"{prefix}.backend=http", f"{prefix}.base_url={url}", f"{prefix}.model={model}", f"{prefix}.constitution={CONSTITUTION}", f"{prefix}.cache={cache}"]


def test_rlhf_judge_over_http_then_reward_trains_on_its_labels(served_judge, tmp_path):
    url, model = served_judge
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS * 2))
    candidates, labels = tmp_path / "candidates.jsonl", tmp_path / "ai_prefs.jsonl"
    rlhf("generate", "--model", str(BASE), "--prompts", str(prompts), "--out", str(candidates), "--num", "3", "--max-new-tokens", "32")
    printed = rlhf("judge", "--candidates", str(candidates), "--out", str(labels), "--task", "pair", *judge_overrides(url, model, tmp_path / "cache.jsonl"))
    summary = json.loads(Path(f"{labels}.judge.json").read_text())
    records = [json.loads(line) for line in labels.read_text().splitlines()]
    # Every pair of distinct candidates was asked in both orders, and nothing came from a cache.
    assert summary["judged in both orders"] + summary.get("unparseable items", 0) == summary["pairs"] > 0
    assert summary["cache_misses"] == 2 * summary["pairs"] and summary["cache_hits"] == 0
    assert records and len(records) == summary["labels"] and f"wrote {len(records)} labels" in printed.stdout
    for r in records:
        assert r["labeler"] == f"ai:{model}" and r["chosen"] != r["rejected"] and r["position_consistent"] in (True, False)
        assert 0.5 <= r["confidence"] <= 1.0 and r["principle"] == "all"
    # transformers serve sends no log-probs: the verdicts were read from the answers' text.
    assert {r["confidence"] for r in records} <= {0.5, 1.0}
    out = tmp_path / "rm"
    rlhf("reward", "--config", str(ROOT / "recipes" / "demo.yaml"), f"reward.model={BASE}", f"reward.data.train=[{labels}]", "reward.data.eval=[]",
         f"reward.output_dir={out}", "reward.normalize.policy=", "reward.normalize.prompts=[]", "reward.optim.epochs=1", "reward.optim.batch_size=4",
         "reward.optim.micro_batch_size=4", "reward.optim.warmup_steps=0")
    from transformers import AutoModelForSequenceClassification

    assert AutoModelForSequenceClassification.from_pretrained(out / "model").config.num_labels == 1


def test_ppo_rewarded_by_the_served_judge_caches_its_answers(served_judge, tmp_path):
    url, model = served_judge
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS))
    common = ["--config", str(ROOT / "recipes" / "demo.yaml"), f"ppo.policy={BASE}", f"ppo.prompts.train=[{prompts}]", "ppo.reward.kind=judge",
              *judge_overrides(url, model, tmp_path / "cache.jsonl", "ppo.reward.judge"), "ppo.algo.batch_size=4", "ppo.algo.minibatch_size=4",
              "ppo.algo.micro_batch_size=4", "ppo.algo.epochs=1", "ppo.stop.max_steps=2", "ppo.oracle=", "ppo.generation.max_new_tokens=24"]
    metrics = []
    for run in ("first", "again"):
        rlhf("ppo", *common, f"ppo.output_dir={tmp_path / run}")
        metrics.append([json.loads(line) for line in (tmp_path / run / "metrics.jsonl").read_text().splitlines()])
    first, again = metrics
    assert first[-1]["judge/cache_hits"] < 8  # 2 steps x 4 completions, asked of the server
    # The same seed samples the same completions: the second run is answered from the cache alone.
    assert [m["score/mean"] for m in again] == [m["score/mean"] for m in first]
    assert again[-1]["judge/cache_hit_rate"] == 1.0 and again[-1]["judge/cache_hits"] == 8


def test_ppo_rewarded_by_the_served_judge_against_reference_responses(served_judge, tmp_path):
    url, model = served_judge
    prompts, references = tmp_path / "prompts.jsonl", tmp_path / "references.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS))
    references.write_text("".join(json.dumps({"prompt": p, "completion": " What a stupid question. Figure it out yourself."}) + "\n" for p in PROMPTS))
    out = tmp_path / "ppo"
    rlhf("ppo", "--config", str(ROOT / "recipes" / "demo.yaml"), f"ppo.policy={BASE}", f"ppo.prompts.train=[{prompts}]", "ppo.reward.kind=judge",
         f"ppo.reward.reference={references}", *judge_overrides(url, model, tmp_path / "cache.jsonl", "ppo.reward.judge"),
         "ppo.algo.batch_size=4", "ppo.algo.minibatch_size=4", "ppo.algo.micro_batch_size=4", "ppo.algo.epochs=1", "ppo.stop.max_steps=1",
         "ppo.oracle=", "ppo.generation.max_new_tokens=24", f"ppo.output_dir={out}")
    (step,) = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    cache = [json.loads(line) for line in (tmp_path / "cache.jsonl").read_text().splitlines()]
    # Each of the 4 completions against its prompt's reference, in both orders: pair questions, no ratings.
    assert step["judge/cache_hits"] == 0 and len(cache) == 8 and {c["text"].strip() for c in cache} <= {"A", "B"}
    assert 0.0 <= step["score/mean"] <= 1.0
