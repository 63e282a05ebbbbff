"""Reward model: head initialisation, learning on pairs / rankings / ratings, bias, plain loading."""

from __future__ import annotations

import json
import math
import random

import pytest
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from conftest import TOPICS, bad_reply, conversation_for, good_reply, prompt_for, write_jsonl
from rlhf import reward
from rlhf.models import load_sequence_classifier, load_tokenizer, score_head
from rlhf.scoring import RewardSourceConfig, load_reward_source
from rlhf.training import OptimConfig


def test_fresh_head_is_normal_with_std_one_over_sqrt_d_plus_one(tiny_model_dir):
    torch.manual_seed(0)
    tokenizer = load_tokenizer(str(tiny_model_dir))
    stds = [score_head(load_sequence_classifier(str(tiny_model_dir), tokenizer, num_labels=1)).weight.std().item() for _ in range(20)]
    d = 64
    assert sum(stds) / len(stds) == pytest.approx(1 / math.sqrt(d + 1), rel=0.1)


def _config(model, train, out, **kw):
    return reward.RewardConfig(
        model=str(model),
        output_dir=str(out),
        data=reward.DataConfig(train=[str(train)], **kw),
        optim=OptimConfig(lr=2e-3, batch_size=16, micro_batch_size=8, epochs=3),
        eval_every=1000,
        precision="fp32",
    )


def test_pairs_train_a_model_that_loads_with_plain_transformers(tiny_model_dir, tiny_data, tmp_path):
    path = reward.train(_config(tiny_model_dir, tiny_data["prefs"], tmp_path / "rm"))
    result = json.loads((tmp_path / "rm" / "eval.json").read_text())
    assert result["accuracy"] >= 0.9 and result["margin"] > 0

    model = AutoModelForSequenceClassification.from_pretrained(path).eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    assert model.config.num_labels == 1 and "reward_bias" in model.config.to_dict()
    assert model.config.resid_pdrop == model.config.attn_pdrop == 0.0  # trained without dropout
    rng = random.Random(5)
    texts = [(prompt_for(t), good_reply(t), bad_reply(t, rng)) for t in TOPICS]
    with torch.no_grad():
        for prompt, good, bad in texts:
            scores = [model(**tokenizer(prompt + c + tokenizer.eos_token, return_tensors="pt")).logits[0, 0] for c in (good, bad)]
            assert scores[0] > scores[1]

    # The stored bias centres the scores of the reference completions (here: the training data's).
    records = [json.loads(line) for line in tiny_data["prefs"].read_text().splitlines()]
    source = load_reward_source(RewardSourceConfig(kind="model", path=str(path)))
    completions = [(r["prompt"], c) for r in records for c in (r["chosen"], r["rejected"])]
    scores = source([p for p, _ in completions], [c for _, c in completions])
    assert abs(scores.mean().item()) < 0.15 * scores.std().item()


def test_rankings_train_above_chance(tiny_model_dir, tmp_path):
    rng = random.Random(2)

    def ranking(topic):
        # best: right topic and polite; then right topic and rude; worst: wrong topic and rude
        other = rng.choice([t for t in TOPICS if t != topic])
        return {"prompt": prompt_for(topic), "completions": [f" {TOPICS[topic]} Happy to help.", f" {TOPICS[topic]} Whatever.", f" {TOPICS[other]} Whatever."]}

    train = write_jsonl(tmp_path / "rank.jsonl", [ranking(rng.choice(list(TOPICS))) for _ in range(96)])
    held = write_jsonl(tmp_path / "rank_eval.jsonl", [ranking(rng.choice(list(TOPICS))) for _ in range(32)])
    path = reward.train(_config(tiny_model_dir, train, tmp_path / "rm", eval=[str(held)]))
    result = json.loads((tmp_path / "rm" / "eval.json").read_text())
    assert result["pairs"] == 32 * 3
    assert result["accuracy"] >= 0.8

    # The score band: 5th and 95th percentiles of the normalised scores of the 96 held-out
    # completions, interpolated between the two nearest of the sorted scores.
    records = [json.loads(line) for line in held.read_text().splitlines()]
    source = load_reward_source(RewardSourceConfig(kind="model", path=str(path)))
    scores = sorted(source([r["prompt"] for r in records for _ in r["completions"]], [c for r in records for c in r["completions"]]).tolist())

    def percentile(q):
        position = q * (len(scores) - 1)
        below = math.floor(position)
        return scores[below] + (position - below) * (scores[below + 1] - scores[below])

    p5, p95 = result["score_band"]
    assert p5 < p95 and (p5, p95) == (pytest.approx(percentile(0.05), abs=1e-4), pytest.approx(percentile(0.95), abs=1e-4))
    assert AutoModelForSequenceClassification.from_pretrained(path).config.reward_score_band == result["score_band"]


def test_ratings_train_above_chance(tiny_model_dir, tmp_path):
    rng = random.Random(3)

    def rating():
        topic = rng.choice(list(TOPICS))
        good = rng.random() < 0.5
        return {"prompt": prompt_for(topic), "completion": good_reply(topic) if good else bad_reply(topic, rng), "label": int(good)}

    train = write_jsonl(tmp_path / "ratings.jsonl", [rating() for _ in range(128)])
    held = write_jsonl(tmp_path / "ratings_eval.jsonl", [rating() for _ in range(48)])
    reward.train(_config(tiny_model_dir, train, tmp_path / "rm", eval=[str(held)]))
    result = json.loads((tmp_path / "rm" / "eval.json").read_text())
    assert result["accuracy"] >= 0.8


def conversational_pairs(n: int, seed: int, implicit: bool) -> list[dict]:
    """Pairs in TRL's conversational format: explicit ({prompt, chosen, rejected} message lists)
    or with an implicit prompt (chosen and rejected whole conversations, as in hh-rlhf)."""
    rng = random.Random(seed)
    records = []
    for _ in range(n):
        topic = rng.choice(list(TOPICS))
        prompt = conversation_for(topic)
        chosen, rejected = ([{"role": "assistant", "content": text.strip()}] for text in (good_reply(topic), bad_reply(topic, rng)))
        records.append({"chosen": prompt + chosen, "rejected": prompt + rejected} if implicit else {"prompt": prompt, "chosen": chosen, "rejected": rejected})
    return records


@pytest.mark.parametrize("source", ["implicit prompts", "conversational pairs", "save_to_disk folder"])
def test_conversational_preferences_train_above_chance(chat_model_dir, tmp_path, source):
    implicit = source == "implicit prompts"
    train, held = conversational_pairs(96, 7, implicit), conversational_pairs(32, 8, implicit)
    if source == "save_to_disk folder":
        import datasets

        splits = {"train": datasets.Dataset.from_list(train), "test": datasets.Dataset.from_list(held)}
        datasets.DatasetDict(splits).save_to_disk(tmp_path / "prefs")
        train_source, held_source = str(tmp_path / "prefs"), f"{tmp_path / 'prefs'}:test"
    else:
        train_source, held_source = write_jsonl(tmp_path / "train.jsonl", train), write_jsonl(tmp_path / "held.jsonl", held)
    reward.train(_config(chat_model_dir, train_source, tmp_path / "rm", eval=[str(held_source)]))
    result = json.loads((tmp_path / "rm" / "eval.json").read_text())
    assert result["pairs"] == 32 and result["accuracy"] >= 0.8


def test_function_and_classifier_sources(tiny_model_dir, tmp_path):
    source = load_reward_source(RewardSourceConfig(kind="function", path="conftest:length_reward"))
    assert source(["a", "b"], ["xx", "yyyy"]).tolist() == [2.0, 4.0]

    from transformers import GPT2ForSequenceClassification

    classifier = GPT2ForSequenceClassification.from_pretrained(tiny_model_dir, num_labels=2, id2label={0: "toxic", 1: "not toxic"})
    tokenizer = load_tokenizer(str(tiny_model_dir))
    classifier.resize_token_embeddings(len(tokenizer))
    classifier.config.pad_token_id = tokenizer.pad_token_id
    classifier.save_pretrained(tmp_path / "clf")
    tokenizer.save_pretrained(tmp_path / "clf")
    source = load_reward_source(RewardSourceConfig(kind="classifier", path=str(tmp_path / "clf"), label="not toxic"))
    ids = tokenizer(" hello there", return_tensors="pt")
    expected = classifier.eval()(**ids).logits[0, 1].item()
    assert source(["ignored prompt"], [" hello there"]).item() == pytest.approx(expected, abs=1e-5)
    with pytest.raises(Exception, match="no label 'friendly'"):
        load_reward_source(RewardSourceConfig(kind="classifier", path=str(tmp_path / "clf"), label="friendly"))


def test_a_reward_model_score_does_not_depend_on_the_padding_of_its_batch(tiny_model_dir, tmp_path):
    # Checklist item 4: the score is read at the last real token, wherever padding puts it.
    tokenizer = load_tokenizer(str(tiny_model_dir))
    model = load_sequence_classifier(str(tiny_model_dir), tokenizer, num_labels=1)
    torch.nn.init.normal_(score_head(model).weight, std=1.0)  # a head that tells positions apart
    model.save_pretrained(tmp_path / "rm")
    tokenizer.save_pretrained(tmp_path / "rm")
    source = load_reward_source(RewardSourceConfig(kind="model", path=str(tmp_path / "rm")))
    short, long = (prompt_for("refund"), good_reply("refund")), (prompt_for("shipping"), good_reply("shipping") * 4)
    alone = source([short[0]], [short[1]])
    padded = source([short[0], long[0]], [short[1], long[1]])  # `short` is right-padded here
    assert len(source.encode(*long)) > len(source.encode(*short)) + 10
    assert padded[0].item() == pytest.approx(alone[0].item(), abs=1e-5)
    assert padded[1].item() != pytest.approx(alone[0].item(), abs=1e-3)
