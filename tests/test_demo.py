"""The demo task: its generator, gold labeler, simulated labelers, data set and shipped base model."""

from __future__ import annotations

import random

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from rlhf.data import Comparison, Rating, load_demonstrations, load_feedback, load_prompts
from rlhf.demo.base import base_model_path
from rlhf.demo.build import MIN_GOLD_MARGIN, build
from rlhf.demo.corpus import (
    DEMO_MIX,
    PRETRAIN_MIX,
    TOPICS,
    all_questions,
    format_prompt,
    sample_exchange,
    split_questions,
)
from rlhf.demo.gold import LABELERS, detect_topic, gold_breakdown, gold_score, score

PROMPT = "User: How do I reset my password?\nAssistant:"
ANSWER = "Click Forgot password on the sign-in page and we will send you a reset link."
REFUND_ANSWER = "Refunds reach the card you paid with within 5 to 7 business days."


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    build(out, seed=0)
    return out


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(base_model_path())


# ---------------------------------------------------------------- corpus


def test_generator_is_deterministic_for_a_seed():
    questions, _ = split_questions()
    draw = lambda seed: [sample_exchange(random.Random(seed), DEMO_MIX, questions) for _ in range(50)]
    assert draw(3) == draw(3)
    assert draw(3) != draw(4)


def test_questions_split_disjoint_and_topics_detected():
    train, held_out = split_questions()
    assert not {q for _, q in train} & {q for _, q in held_out}
    assert {t for t, _ in train} == {t for t, _ in held_out} == {t.name for t in TOPICS}
    assert 15 <= len(TOPICS) <= 25
    for topic, question in all_questions():
        assert detect_topic(format_prompt(question)) == topic, question
    for topic in TOPICS:  # an answer names its own topic's subject and no other's
        for answer in topic.answers:
            assert [t.name for t in TOPICS if t.subject in answer.lower()] == [topic.name], answer


def test_prompts_and_replies_fit_the_token_budget(tokenizer):
    questions = all_questions()
    assert max(len(tokenizer(format_prompt(q)).input_ids) for _, q in questions) <= 24
    rng = random.Random(0)
    for mix in (PRETRAIN_MIX, DEMO_MIX):
        exchanges = [sample_exchange(rng, mix, questions) for _ in range(500)]
        assert max(len(tokenizer(e.completion).input_ids) for e in exchanges) <= 60
        assert all(e.completion.startswith(" ") and e.prompt.endswith("\nAssistant:") for e in exchanges)


# ---------------------------------------------------------------- gold


def test_gold_orders_hand_written_replies():
    best_to_worst = [
        f" Happy to help with that. {ANSWER} Hope this helps!",
        f" Happy to help with that. {ANSWER} Our team works hard every single day. Hope this helps!",
        f" {ANSWER}",
        " Happy to help with that. Please check our website for more details. Hope this helps!",
        f" Happy to help with that. {REFUND_ANSWER} Hope this helps!",
        f" What a stupid question. {ANSWER}",
        "",
        " Figure it out yourself, idiot.",
    ]
    scores = [gold_score(PROMPT, c) for c in best_to_worst]
    assert scores == sorted(scores, reverse=True), scores
    assert len(set(scores)) == len(scores)


def test_gold_caps_politeness_and_penalises_repetition():
    two = gold_score(PROMPT, f" Happy to help with that. {ANSWER} Hope this helps!")
    repeated = gold_score(PROMPT, f" Happy to help with that. {ANSWER} Hope this helps! Hope this helps!")
    stuffed = gold_score(PROMPT, f" Happy to help with that. Great question! {ANSWER} Hope this helps! Have a great day!")
    assert repeated < two
    assert stuffed < two


def test_gold_answer_must_match_the_prompts_topic():
    refund_prompt = "User: When will I get my refund?\nAssistant:"
    assert gold_score(PROMPT, f" {ANSWER}") > gold_score(PROMPT, f" {REFUND_ANSWER}")
    assert gold_score(refund_prompt, f" {REFUND_ANSWER}") > gold_score(refund_prompt, f" {ANSWER}")
    assert gold_score(PROMPT, f" {REFUND_ANSWER}") < gold_score(PROMPT, " Please check our website for more details.")


def test_gold_penalises_novel_text_and_insults_anywhere():
    assert gold_score(PROMPT, f" {ANSWER} Blah blah blah") < gold_score(PROMPT, f" {ANSWER}")
    assert gold_score(PROMPT, f" {ANSWER} You are so dumb.") < gold_score(PROMPT, f" {ANSWER} Blah blah blah")
    assert gold_breakdown(PROMPT, f" Happy to help with that. {ANSWER} Hope this helps!").best
    assert not gold_breakdown(PROMPT, f" {ANSWER} Hope this helps!").best


def test_score_has_the_reward_function_signature():
    prompts, completions = [PROMPT, PROMPT], [f" {ANSWER}", " Fine."]
    assert score(prompts=prompts, completions=completions, topic=["a", "b"]) == [
        gold_score(PROMPT, f" {ANSWER}"),
        gold_score(PROMPT, " Fine."),
    ]


def test_simulated_labelers_agree_with_gold_above_chance_not_perfectly():
    questions, _ = split_questions()
    rng = random.Random(0)
    pairs = []
    while len(pairs) < 400:
        a, b = sample_exchange(rng, DEMO_MIX, questions), sample_exchange(rng, DEMO_MIX, questions)
        if gold_score(a.prompt, a.completion) != gold_score(a.prompt, b.completion):
            pairs.append((a.prompt, a.completion, b.completion))
    agreement = {}
    for labeler in LABELERS:
        votes = [
            labeler.prefers(rng, p, a, b) == (gold_score(p, a) > gold_score(p, b)) for p, a, b in pairs
        ]
        agreement[labeler.name] = sum(votes) / len(votes)
    assert all(0.6 < a < 0.98 for a in agreement.values()), agreement
    assert agreement["careful"] > agreement["sloppy"]


# ---------------------------------------------------------------- data set


def test_build_writes_files_that_the_loaders_read(data_dir):
    sft = load_demonstrations(data_dir / "sft.jsonl")
    assert len(sft) == 2000 and all(d.completion.startswith(" ") for d in sft)
    train_prompts = {p.prompt for p in load_prompts(data_dir / "prompts_train.jsonl")}
    eval_prompts = {p.prompt for p in load_prompts(data_dir / "prompts_eval.jsonl")}
    assert train_prompts and eval_prompts and not train_prompts & eval_prompts
    labelers = {labeler.name for labeler in LABELERS}
    for name, kind, prompts, who in [
        ("prefs_train", Comparison, train_prompts, labelers),
        ("prefs_eval_gold", Comparison, eval_prompts, {"gold"}),
        ("rankings_train", Comparison, train_prompts, labelers),
        ("rankings_eval", Comparison, eval_prompts, {"gold"}),
        ("ratings_train", Rating, train_prompts, labelers),
        ("ratings_eval", Rating, eval_prompts, {"gold"}),
    ]:
        records = load_feedback(data_dir / f"{name}.jsonl")
        assert all(isinstance(r, kind) for r in records), name
        assert {r.prompt for r in records} <= prompts, name
        assert {r.labeler for r in records} == who, name
    assert {len(r.completions) for r in load_feedback(data_dir / "rankings_train.jsonl")} == {4}
    assert {r.label for r in load_feedback(data_dir / "ratings_train.jsonl")} == {0.0, 1.0}


def test_gold_labelled_feedback_is_clear_cut(data_dir):
    for name in ("prefs_eval_gold", "rankings_eval"):
        for record in load_feedback(data_dir / f"{name}.jsonl"):
            scores = [gold_score(record.prompt, c) for c in record.completions]
            assert all(a - b >= MIN_GOLD_MARGIN for a, b in zip(scores, scores[1:])), name


def test_build_is_deterministic_for_a_seed(data_dir, tmp_path):
    build(tmp_path, seed=0)
    for path in data_dir.iterdir():
        assert (tmp_path / path.name).read_bytes() == path.read_bytes(), path.name


# ---------------------------------------------------------------- shipped base model


def test_shipped_base_model_loads_with_plain_transformers(tokenizer):
    path = base_model_path()
    assert sum(f.stat().st_size for f in path.iterdir()) < 20 * 2**20
    model = AutoModelForCausalLM.from_pretrained(path)
    assert tokenizer.pad_token is None
    assert tokenizer.eos_token == "<|endoftext|>" and tokenizer.eos_token_id is not None
    assert model.config.eos_token_id == tokenizer.eos_token_id
    assert model.get_input_embeddings().num_embeddings == len(tokenizer)

    prompt = tokenizer(PROMPT, return_tensors="pt")
    with torch.no_grad():
        output = model.generate(**prompt, max_new_tokens=64, do_sample=False, pad_token_id=tokenizer.eos_token_id)
    reply = output[0, prompt.input_ids.shape[1] :].tolist()
    assert reply[-1] == tokenizer.eos_token_id, "the greedy reply does not end with EOS"
    assert gold_breakdown(PROMPT, tokenizer.decode(reply[:-1])).answer > 0, "the greedy reply does not answer"
