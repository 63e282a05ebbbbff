"""Personalisation: a reward model that knows who judged, shrinkage for a labeler with few labels,
the stored format, per-labeler PPO and `rlhf personalize`."""

from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from conftest import TOPICS, bad_reply, prompt_for, write_jsonl
from rlhf import reward
from rlhf.config import ConfigError
from rlhf.models import load_tokenizer, load_value_model
from rlhf.scoring import RewardSourceConfig, check_reward_path, load_reward_source
from rlhf.training import OptimConfig

HERE = Path(__file__).parent
CLOSERS = {"alice": " Happy to help.", "bob": " Whatever."}
"""Each labeler's favourite way to close a right answer; both rank a wrong answer last."""


def reply(topic: str, closer: str) -> str:
    return f" {TOPICS[topic]}{closer}"


def alice_utility(prompts, completions, **kwargs):
    return [float("Happy to help" in c) for c in completions]


def bob_utility(prompts, completions, **kwargs):
    return [float("Whatever" in c) for c in completions]


def rankings(rng: random.Random, labeler: str, n: int, noise: bool = False) -> list[dict]:
    """`n` rankings of a right answer closed both ways and a wrong one, by `labeler`'s taste (or
    the closers in a random order, with `noise`)."""
    records = []
    for _ in range(n):
        topic = rng.choice(list(TOPICS))
        closers = list(CLOSERS.values())
        if noise:
            rng.shuffle(closers)
        else:
            closers.sort(key=lambda c: c != CLOSERS[labeler])
        wrong = f" No idea.{rng.choice(closers)}"
        records.append({"prompt": prompt_for(topic), "completions": [reply(topic, c) for c in closers] + [wrong], "labeler": labeler})
    return records


def personal_config(model, train, held_out, out, **personal) -> reward.RewardConfig:
    return reward.RewardConfig(
        model=str(model), output_dir=str(out),
        data=reward.DataConfig(train=[str(train)], eval=[str(held_out)]),
        optim=OptimConfig(lr=2e-3, batch_size=16, micro_batch_size=8, epochs=4),
        personal=reward.PersonalConfig(enabled=True, **personal),
        eval_every=1000, precision="fp32",
    )


@pytest.fixture(scope="module")
def personal_rm(tiny_model_dir, tmp_path_factory) -> Path:
    """A personal reward model on alice's and bob's opposite tastes (96 rankings each) and 20
    rankings of carol's that carry no taste at all (the closers in a random order)."""
    rng = random.Random(7)
    root = tmp_path_factory.mktemp("personal")
    train = rankings(rng, "alice", 96) + rankings(rng, "bob", 96) + rankings(rng, "carol", 20, noise=True)
    rng.shuffle(train)
    held_out = rankings(rng, "alice", 24) + rankings(rng, "bob", 24)
    return reward.train(personal_config(tiny_model_dir, write_jsonl(root / "train.jsonl", train), write_jsonl(root / "eval.jsonl", held_out), root / "rm"))


def test_each_labeler_is_scored_by_their_own_taste_where_the_pooled_score_cannot_be(personal_rm):
    table = json.loads((personal_rm.parent / "eval.json").read_text())["labelers"]
    # the tastes are opposite: one pooled score cannot serve both, each labeler's own does
    assert (table["alice"]["pooled_accuracy"] + table["bob"]["pooled_accuracy"]) / 2 <= 0.85, table
    assert (table["alice"]["own_accuracy"] + table["bob"]["own_accuracy"]) / 2 >= 0.95, table
    for name in ("alice", "bob"):
        entry = table[name]
        assert entry["train_labels"] == 96 and entry["weight"] == pytest.approx(96 / 146)
        assert entry["own_accuracy"] >= entry["pooled_accuracy"]
        assert all(d["own_margin"] > 0 > d["pooled_margin"] or d["own_margin"] < 0 < d["pooled_margin"] for d in entry["disagreements"])
    # the held-out comparisons where the pooled score and the labeler's own part, worst first, by file:line
    split = min(table.values(), key=lambda entry: entry["pooled_accuracy"])["disagreements"]
    assert split and split[0]["source"].startswith(str(personal_rm.parent.parent / "eval.jsonl") + ":")
    assert len({d["source"] for d in split}) == len(split)  # a comparison once, by its largest split
    assert [abs(d["own_margin"] - d["pooled_margin"]) for d in split] == sorted((abs(d["own_margin"] - d["pooled_margin"]) for d in split), reverse=True)

    prompt = prompt_for("refund")
    for name, closer in CLOSERS.items():
        source = load_reward_source(RewardSourceConfig(path=str(personal_rm), labeler=name))
        other = next(c for c in CLOSERS.values() if c != closer)
        favourite, second = source([prompt, prompt], [reply("refund", closer), reply("refund", other)]).tolist()
        assert favourite > second + 0.5


def test_a_labeler_with_20_labels_that_say_nothing_gets_about_the_pooled_score(personal_rm):
    """Shrinkage: carol's 20 rankings are noise; her score stays near the pooled one."""
    rng = random.Random(11)
    prompts, completions = [], []
    for topic in TOPICS:
        for closer in [*CLOSERS.values(), " Thanks."]:
            prompts.append(prompt_for(topic))
            completions.append(reply(topic, closer))
        prompts.append(prompt_for(topic))
        completions.append(bad_reply(topic, rng))
    pooled = load_reward_source(RewardSourceConfig(path=str(personal_rm)))(prompts, completions)
    scores = {name: load_reward_source(RewardSourceConfig(path=str(personal_rm), labeler=name))(prompts, completions) for name in ("alice", "carol")}
    config = AutoModelForSequenceClassification.from_pretrained(personal_rm).config
    assert config.reward_labelers["carol"]["weight"] == pytest.approx(20 / 70)

    def departure(s):  # from the pooled score, centred (each labeler's bias is their own)
        return ((s - s.mean()) - (pooled - pooled.mean())).abs().mean().item() / pooled.std().item()

    assert torch.corrcoef(torch.stack([scores["carol"], pooled]))[0, 1] > 0.95
    # unshrunk, carol's noise departs about 0.9 pooled standard deviations on average, alice's taste 2.3
    assert departure(scores["carol"]) < 0.35
    assert departure(scores["alice"]) > 4 * departure(scores["carol"])  # a labeler with a taste departs


def test_the_stored_format_plain_transformers_reads_the_pooled_score(personal_rm):
    model = AutoModelForSequenceClassification.from_pretrained(personal_rm).eval()
    tokenizer = AutoTokenizer.from_pretrained(personal_rm)
    config = model.config
    assert config.num_labels == 4 and config.reward_prior_labels == 50
    assert {name: entry["column"] for name, entry in config.reward_labelers.items()} == {"alice": 1, "bob": 2, "carol": 3}
    assert config.reward_labelers["alice"]["labels"] == 96

    prompt, completion = prompt_for("invoice"), reply("invoice", CLOSERS["bob"])
    with torch.no_grad():
        logits = model(**tokenizer(prompt + completion + tokenizer.eos_token, return_tensors="pt")).logits[0]
    pooled = load_reward_source(RewardSourceConfig(path=str(personal_rm)))([prompt], [completion]).item()
    assert pooled == pytest.approx(config.reward_gain * (logits[0].item() + config.reward_bias), abs=1e-4)
    bob = config.reward_labelers["bob"]
    own = load_reward_source(RewardSourceConfig(path=str(personal_rm), labeler="bob"))([prompt], [completion]).item()
    assert own == pytest.approx(bob["gain"] * (logits[0].item() + bob["weight"] * logits[bob["column"]].item() + bob["bias"]), abs=1e-4)

    # a critic started from it keeps the pooled output alone
    value = load_value_model(str(personal_rm), load_tokenizer(str(personal_rm))).eval()
    with torch.no_grad():
        out = value(**tokenizer(prompt + completion + tokenizer.eos_token, return_tensors="pt")).logits[0]
    assert out.shape == (1,) and out[0].item() == pytest.approx(logits[0].item(), abs=1e-5)
    assert not hasattr(value.config, "reward_labelers")  # a critic saved from it is no personal reward model
    low, high = bob["score_band"]
    assert low < high and load_reward_source(RewardSourceConfig(path=str(personal_rm), labeler="bob")).score_band == (low, high)


def test_a_labeler_the_reward_model_does_not_know_is_refused_with_the_key(personal_rm, tiny_model_dir, tmp_path):
    with pytest.raises(ConfigError, match=r"^ppo.reward.labeler: .* has no labeler 'dave'; it knows \['alice', 'bob', 'carol'\]$"):
        check_reward_path(RewardSourceConfig(path=str(personal_rm), labeler="dave"), "ppo.reward")
    plain = reward.train(reward.RewardConfig(
        model=str(tiny_model_dir), output_dir=str(tmp_path / "plain"),
        data=reward.DataConfig(train=[str(write_jsonl(tmp_path / "t.jsonl", rankings(random.Random(1), "alice", 16)))]),
        optim=OptimConfig(batch_size=8, micro_batch_size=8, max_steps=1), precision="fp32",
    ))
    with pytest.raises(ConfigError, match=r"^ppo.reward.labeler: .* is not a personal reward model \(train it with reward.personal.enabled=true\)"):
        check_reward_path(RewardSourceConfig(path=str(plain), labeler="alice"), "ppo.reward")
    with pytest.raises(ConfigError, match=r"^reward.model: .* is a trained reward model; a personal one starts from a language model"):
        reward.train(personal_config(plain, tmp_path / "t.jsonl", tmp_path / "t.jsonl", tmp_path / "warm"))
    with pytest.raises(ConfigError, match=r"^ppo.reward.labeler: only a personal reward model \(kind model\)"):
        from rlhf.scoring import check_reward_source

        check_reward_source(RewardSourceConfig(kind="function", path="conftest:length_reward", labeler="alice"), "ppo.reward")


def test_personal_training_without_labelers_is_refused_naming_the_file(tiny_model_dir, tmp_path):
    records = [{k: v for k, v in r.items() if k != "labeler"} for r in rankings(random.Random(2), "alice", 16)]
    train = write_jsonl(tmp_path / "anonymous.jsonl", records)
    result = subprocess.run(
        [sys.executable, "-m", "rlhf", "reward", "--config", "/dev/null", f"reward.model={tiny_model_dir}", f"reward.data.train=[{train}]",
         f"reward.output_dir={tmp_path / 'rm'}", "reward.personal.enabled=true"],
        capture_output=True, text=True, env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(HERE)}, timeout=300,
    )
    assert result.returncode == 2, result.stderr[-2000:]
    assert f"error: {train}" in result.stderr and "reward.personal.enabled: no labeler has 1 or more labels" in result.stderr
    assert "Traceback" not in result.stderr


def test_personalize_trains_an_adapter_per_labeler_and_judges_each_by_its_labeler(tiny_sft_dir, tiny_prompts, tiny_model_dir, tmp_path):
    rng = random.Random(3)
    train = write_jsonl(tmp_path / "train.jsonl", rankings(rng, "alice", 48) + rankings(rng, "bob", 48))
    out = tmp_path / "personal"
    generation = {"temperature": 1.0, "max_new_tokens": 8}
    recipe = {
        "reward": {"model": str(tiny_sft_dir), "optim": {"lr": 2e-3, "batch_size": 16, "micro_batch_size": 16, "epochs": 2}, "precision": "fp32"},
        "ppo": {"policy": str(tiny_sft_dir), "prompts": {"train": [str(tiny_prompts)]}, "generation": generation, "precision": "fp32",
                "algo": {"batch_size": 8, "minibatch_size": 8, "micro_batch_size": 8, "epochs": 1}, "stop": {"max_steps": 2}, "optim": {"lr": 1e-3}, "kl": {"beta": 0.1}},
        "eval": {"prompts": [str(tiny_prompts)], "oracle": "conftest:polite_reward", "generation": generation},
        "personalize": {"feedback": [str(train)], "oracles": {"alice": "test_personal:alice_utility", "bob": "test_personal:bob_utility"},
                        "seeds": [0], "samples_per_prompt": 2, "labeler_beta": 0.3, "output_dir": str(out)},
    }
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    env = {"PYTHONPATH": str(HERE), "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-m", "rlhf", "personalize", str(path)], capture_output=True, text=True, cwd=tmp_path, env=env, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]

    for name in ("pooled", "alice", "bob"):
        ppo = yaml.safe_load((out / "s0" / name / "recipe.yaml").read_text())["ppo"]
        assert ppo["lora"]["enabled"] and ppo["reward"]["path"] == str(out / "reward" / "model")
        assert ppo["reward"]["labeler"] == ("" if name == "pooled" else name)
        # a labeler's adapter trains on the pooled policy, its KL reference too
        assert ppo["policy"] == (str(tiny_sft_dir) if name == "pooled" else str(out / "s0" / "pooled" / "model")) and not ppo.get("reference")
        assert ppo["kl"]["beta"] == (0.1 if name == "pooled" else 0.3)
        assert (out / "s0" / name / "model" / "adapter" / "adapter_config.json").exists()
    rows = json.loads((out / "s0" / "eval" / "results.json").read_text())
    assert set(rows) == {"alice", "bob"} and all(0 <= r["win_rate"] <= 1 and r["prompts"] == 64 for r in rows.values())
    samples = [json.loads(line) for line in (out / "s0" / "eval" / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == 128 and {"pooled", "alice", "bob"} <= set(samples[0])
    report = (out / "report.md").read_text()
    assert report.count("\n| alice | ") == report.count("\n| bob | ") == 2  # the reward model's table and the adapters'
    assert "win-rate by own utility" in report
    # evaluated again when what it compares changes, not read from the last evaluation
    recipe["personalize"]["samples_per_prompt"] = 1
    path.write_text(yaml.safe_dump(recipe))
    result = subprocess.run([sys.executable, "-m", "rlhf", "personalize", str(path)], capture_output=True, text=True, cwd=tmp_path, env=env, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    assert len((out / "s0" / "eval" / "samples.jsonl").read_text().splitlines()) == 64


def test_adapters_on_one_base_are_picked_by_name(tiny_model_dir, tmp_path):
    from peft import LoraConfig, get_peft_model

    from rlhf.models import load_causal_lm
    from rlhf.personal import load_adapters

    tokenizer = load_tokenizer(str(tiny_model_dir))
    ids = tokenizer(prompt_for("refund"), return_tensors="pt")
    expected = {}
    for seed, name in enumerate(("alice", "bob")):
        torch.manual_seed(seed)
        peft = get_peft_model(load_causal_lm(str(tiny_model_dir), tokenizer), LoraConfig(r=4, target_modules=["c_attn"], init_lora_weights=False))
        peft.save_pretrained(tmp_path / name)
        with torch.no_grad():
            expected[name] = peft.eval()(**ids).logits
    model = load_adapters(str(tiny_model_dir), {name: tmp_path / name for name in expected}, tokenizer)
    for name in ("bob", "alice", "bob"):
        model.set_adapter(name)
        with torch.no_grad():
            assert torch.allclose(model(**ids).logits, expected[name], atol=1e-5)
    assert not torch.allclose(expected["alice"], expected["bob"], atol=1e-3)


def test_personalize_refuses_a_recipe_it_cannot_judge_naming_the_key():
    from rlhf import personal
    from rlhf.config import load_recipe
    from rlhf.pipeline import Recipe

    base = ["personalize.feedback=[f.jsonl]", "eval.oracle=conftest:polite_reward", "eval.prompts=[p.jsonl]"]
    cases = [
        ([], r"^personalize.oracles is required"),
        (["personalize.oracles={alice: 'conftest:polite_reward'}", "personalize.labelers=[alice,bob]"], r"^personalize.oracles: no utility for the labelers \['bob'\]"),
        (["personalize.oracles={pooled: 'conftest:polite_reward'}"], r"^personalize.oracles: 'pooled' names the pooled adapter"),
        (["personalize.oracles={alice: 'nomodule:f'}"], r"^personalize.oracles.alice: cannot import 'nomodule'"),
        (["personalize.oracles={alice: 'conftest:polite_reward'}", "eval.oracle="], r"^eval.oracle and eval.prompts are required"),
    ]
    for overrides, message in cases:
        with pytest.raises(ConfigError, match=message):
            personal.check_config(load_recipe(Recipe, None, base + overrides))
    with pytest.raises(ConfigError, match=r"^personalize.feedback is required"):
        personal.check_config(load_recipe(Recipe, None, []))


def test_personalize_refuses_a_labeler_who_gave_no_labels(tmp_path):
    from rlhf import personal
    from rlhf.config import load_recipe
    from rlhf.pipeline import Recipe

    feedback = write_jsonl(tmp_path / "f.jsonl", rankings(random.Random(0), "alice", 3))
    recipe = load_recipe(Recipe, None, [f"personalize.feedback=[{feedback}]", "eval.oracle=conftest:polite_reward", "eval.prompts=[p.jsonl]",
                                        "personalize.oracles={alice: 'conftest:polite_reward', bob: 'conftest:polite_reward'}"])
    personal.check_config(recipe)  # the recipe alone is fine; the feedback files are read when the run starts
    with pytest.raises(ConfigError, match=r"^personalize.oracles: \['bob'\] gave no labels in personalize.feedback .*its labelers are \['alice'\]$"):
        personal.validate(recipe)


def test_ratings_train_a_personal_reward_model_too(tiny_model_dir, tmp_path):
    rng = random.Random(8)

    def ratings(labeler, n):
        records = []
        for _ in range(n):
            topic, closer = rng.choice(list(TOPICS)), rng.choice(list(CLOSERS.values()))
            records.append({"prompt": prompt_for(topic), "completion": reply(topic, closer), "label": int(closer == CLOSERS[labeler]), "labeler": labeler})
        return records

    train = write_jsonl(tmp_path / "train.jsonl", ratings("alice", 96) + ratings("bob", 96))
    held_out = write_jsonl(tmp_path / "eval.jsonl", ratings("alice", 24) + ratings("bob", 24))
    path = reward.train(personal_config(tiny_model_dir, train, held_out, tmp_path / "rm"))
    table = json.loads((path.parent / "eval.json").read_text())["labelers"]
    assert (table["alice"]["own_accuracy"] + table["bob"]["own_accuracy"]) / 2 >= 0.9, table
    assert (table["alice"]["pooled_accuracy"] + table["bob"]["pooled_accuracy"]) / 2 <= 0.75, table


class Crash(Exception):
    pass


def test_a_personal_reward_model_resumes_exactly(tiny_model_dir, tmp_path, monkeypatch):
    """Killed after its checkpoint, a run resumes with each labeler's trained columns, not fresh ones."""
    from rlhf.tracking import Tracker, read_metrics

    rng = random.Random(5)
    train = write_jsonl(tmp_path / "train.jsonl", rankings(rng, "alice", 48) + rankings(rng, "bob", 48))
    held_out = write_jsonl(tmp_path / "eval.jsonl", rankings(rng, "alice", 8) + rankings(rng, "bob", 8))

    def config(out):
        c = personal_config(tiny_model_dir, train, held_out, tmp_path / out)
        c.optim.max_steps, c.save_every, c.log_every, c.eval_every = 10, 4, 1, 5
        return c

    reward.train(config("full"))
    original = Tracker.log

    def log(self, at, metrics):
        if at == 7:  # checkpoints at 4 (and 8): steps 5-6 were logged, then lost
            raise Crash
        original(self, at, metrics)

    interrupted = config("part")
    with monkeypatch.context() as patch:
        patch.setattr(Tracker, "log", log)
        with pytest.raises(Crash):
            reward.train(interrupted)
    interrupted.resume = True
    reward.train(interrupted)
    a = {m["step"]: m for m in read_metrics(tmp_path / "full")}
    b = {m["step"]: m for m in read_metrics(tmp_path / "part")}
    assert sorted(a) == sorted(b) == list(range(1, 11))
    for step in a:
        for key in ("train/loss", "eval/accuracy"):
            if key in a[step]:
                assert b[step][key] == pytest.approx(a[step][key], rel=1e-5, abs=1e-6), (step, key)
    full, part = (json.loads((tmp_path / run / "eval.json").read_text())["labelers"] for run in ("full", "part"))
    assert {n: e["own_accuracy"] for n, e in full.items()} == {n: pytest.approx(e["own_accuracy"], abs=1e-6) for n, e in part.items()}
