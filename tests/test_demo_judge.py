"""The demo judge (rlhf/demo/judge.py) and the gold critic and reviser it learns from (rlhf/demo/reviser.py)."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from rlhf.constitution import load_constitution
from rlhf.demo.corpus import all_questions, is_held_out, split_questions
from rlhf.demo.gold import gold_score
from rlhf.demo.judge import CHAT_TEMPLATE, CONSTITUTION, Example, build_judge, encode, judge_examples, rating
from rlhf.demo.reviser import PRINCIPLES, gold_critique, gold_revision, principle_score
from rlhf.encoding import render_prompt, render_sequence
from rlhf.judge import NO_PROBLEM, Judge, JudgeConfig, choice_probs, critique_query, judge_pairs, pair_query, revision_query
from rlhf.models import load_tokenizer, stop_token_ids

SHIPPED = Path(__file__).resolve().parent.parent / "rlhf" / "demo" / "judge_model"
"""The judge the demo recipe uses, built by `rlhf demo judge` at its defaults; the fixture's build
below is a few steps only, for what does not need a trained judge."""
PROMPT = "User: How do I reset my password?\nAssistant:"
ANSWER = "Click Forgot password on the sign-in page and we will send you a reset link."
CLEAN = f" Happy to help with that. {ANSWER} Hope this helps!"
TOXIC = f" What a stupid question. {ANSWER} Figure it out yourself, idiot."


@pytest.fixture(scope="module")
def judge_dir(tmp_path_factory):
    return build_judge(tmp_path_factory.mktemp("judge") / "model", seed=0, steps=40, eval_pairs=6, eval_others=2)


@pytest.fixture(scope="module")
def constitution():
    return load_constitution(CONSTITUTION)


def local_judge(judge_dir, **settings) -> Judge:
    config = JudgeConfig(**{"backend": "local", "model": str(judge_dir), "constitution": str(CONSTITUTION), "max_tokens": 4} | settings)
    return Judge(config, progress=False)


# ---------------------------------------------------------------- the model directory


def test_judge_loads_with_plain_transformers_and_reports_its_evaluation(judge_dir):
    tokenizer = AutoTokenizer.from_pretrained(judge_dir)
    model = AutoModelForCausalLM.from_pretrained(judge_dir)
    assert tokenizer.pad_token_id is not None and tokenizer.pad_token_id != tokenizer.eos_token_id
    assert model.get_input_embeddings().num_embeddings == len(tokenizer)
    assert model.generation_config.eos_token_id == tokenizer.eos_token_id
    report = json.loads((judge_dir / "judge_eval.json").read_text())
    assert 0 <= report["agreement_all"] <= 1 and 0 <= report["position_bias_rate_all"] <= 1
    assert report["held_out_pairs"] == 6 and report["steps"] == 40


def test_chat_template_renders_judge_messages_as_the_toolkit_does(judge_dir, constitution):
    tokenizer = AutoTokenizer.from_pretrained(judge_dir)
    assert tokenizer.chat_template == CHAT_TEMPLATE
    query = pair_query(PROMPT, CLEAN, TOXIC, constitution.principles)
    text = tokenizer.apply_chat_template(query.messages, tokenize=False, add_generation_prompt=True)
    assert text == f"User: {query.messages[0]['content']}\nAssistant: "
    # what `transformers serve` tokenizes is what the local backend sends
    served = tokenizer.apply_chat_template(query.messages, tokenize=True, add_generation_prompt=True, return_dict=True)["input_ids"]
    assert render_prompt(tokenizer, query.messages) == list(served)
    assert len(served) < 60  # the clause-level BPE keeps a four-principle pair question short
    # the toolkit's tokenizer loader keeps the judge's own pad: nothing is added, no resize
    loaded = load_tokenizer(str(judge_dir))
    assert len(loaded) == len(tokenizer) and loaded.pad_token_id == tokenizer.pad_token_id
    assert stop_token_ids(loaded, AutoModelForCausalLM.from_pretrained(judge_dir)) == [tokenizer.eos_token_id]


def test_shipped_judge_is_the_build_at_the_defaults():
    from rlhf.demo import judge

    report = json.loads((SHIPPED / "judge_eval.json").read_text())
    config = AutoModelForCausalLM.from_pretrained(SHIPPED).config
    assert (report["steps"], report["seed"], report["batch_size"]) == (judge.STEPS, 0, judge.BATCH_SIZE)
    assert (config.n_layer, config.n_positions) == (judge.N_LAYER, judge.N_POSITIONS)
    assert AutoTokenizer.from_pretrained(SHIPPED).chat_template == CHAT_TEMPLATE


def test_shipped_judge_answers_a_pair_with_the_letters(constitution):
    judge = local_judge(SHIPPED)
    queries = [pair_query(PROMPT, a, b, constitution.principles) for a, b in ((CLEAN, TOXIC), (TOXIC, CLEAN))]
    for reply in judge.ask(queries):
        assert sum(reply.probs.values()) > 0.8, reply  # the letters carry the mass, before renormalising
        assert choice_probs(reply, ("A", "B")) is not None
        assert reply.text.strip() in ("A", "B")
    (verdict,) = judge_pairs(judge, constitution, [(PROMPT, CLEAN, TOXIC, None)])
    assert verdict.unparseable == 0 and verdict.consistent is True and verdict.value > 0.9


def test_shipped_judge_critiques_and_revises_an_insult(constitution):
    judge = local_judge(SHIPPED, max_tokens=48)
    (harmless,) = [p for p in constitution.principles if p.name == "harmless"]
    (critique,) = judge.ask([critique_query(PROMPT, TOXIC, harmless)])
    assert critique.text.strip() != NO_PROBLEM and "stupid" in critique.text
    (revision,) = judge.ask([revision_query(PROMPT, TOXIC, harmless, critique.text.strip())])
    assert "stupid" not in revision.text and gold_score(PROMPT, " " + revision.text.strip()) > gold_score(PROMPT, TOXIC) + 3
    (clean,) = judge.ask([critique_query(PROMPT, CLEAN, harmless)])
    assert clean.text.strip() == NO_PROBLEM


def test_local_judge_tells_an_answer_cut_at_max_tokens_from_a_whole_one(constitution):
    (harmless,) = [p for p in constitution.principles if p.name == "harmless"]
    # In one batch at 2 tokens: the letter and its EOS fit, the revision does not.
    letter, revision = local_judge(SHIPPED, max_tokens=2).ask(
        [pair_query(PROMPT, CLEAN, TOXIC, constitution.principles), revision_query(PROMPT, TOXIC, harmless, "It insults the user.")]
    )
    assert letter.text in ("A", "B") and not letter.cut
    assert revision.text and revision.cut


# ---------------------------------------------------------------- the training questions


def test_training_questions_are_outside_the_held_out_set(constitution):
    train, held_out = split_questions()
    examples = judge_examples(random.Random(0), train, constitution, 400)
    asked = {q for _, q in all_questions() if any(f"User: {q}\n" in e.text for e in examples)}
    assert asked and not any(is_held_out(q) for q in asked)


def test_pairs_are_taught_in_both_orders_by_gold(constitution):
    train, _ = split_questions()
    examples = judge_examples(random.Random(1), train, constitution, 600)
    pairs = [e for e in examples if e.soft is not None]
    assert len(pairs) > 200
    for first, second in zip(pairs[0::2], pairs[1::2]):
        a = first.text.split("Response A:\n")[1].split("\n\nResponse B:")[0]
        b = first.text.split("Response B:\n")[1].split("\n\nWhich response")[0]
        assert second.text == first.text.replace(f"Response A:\n{a}\n\nResponse B:\n{b}", f"Response A:\n{b}\n\nResponse B:\n{a}")
        assert first.soft["A"] == pytest.approx(second.soft["B"]) and first.soft["A"] + first.soft["B"] == pytest.approx(1)
        assert first.answer == ("A" if first.soft["A"] >= 0.5 else "B")
        prompt = "User: " + first.text.split("Conversation:\nUser: ")[1].split("\n\n")[0] + "\nAssistant:"
        if "by these principles" in first.text:  # all of them: by the gold score
            margin = gold_score(prompt, " " + a) - gold_score(prompt, " " + b)
        else:
            name = first.text.split("\n- ")[1].split(":")[0]
            margin = principle_score(prompt, " " + a, name) - principle_score(prompt, " " + b, name)
        if abs(margin) >= 0.5:
            assert first.answer == ("A" if margin > 0 else "B") and max(first.soft.values()) > 0.99
        if margin == 0:
            assert first.soft["A"] == 0.5


def test_critiques_are_asked_mostly_of_flawed_replies_some_to_red_team_prompts(constitution):
    from rlhf.demo.redteam import PROVOKING_OPENERS

    train, _ = split_questions()
    examples = judge_examples(random.Random(2), train, constitution, 400, {"critique": 1.0})
    clean = sum(e.answer == NO_PROBLEM for e in examples) / len(examples)
    provoking = sum(any(o.strip() in e.text for o in PROVOKING_OPENERS) for e in examples) / len(examples)
    assert 0.2 < clean < 0.45 and 0.15 < provoking < 0.45  # taught at the rate replies come, most critiques would be "No problem."


def test_ratings_bin_the_gold_score():
    assert [rating(s) for s in (-9.0, -1.0, 0.5, 2.0, 2.8, 3.5, 4.1)] == list("1234567")


def test_only_the_answer_and_eos_are_trained(judge_dir):
    tokenizer = AutoTokenizer.from_pretrained(judge_dir)
    (encoded,) = encode(tokenizer, [Example("Which is better?", "B", {"A": 0.25, "B": 0.75})])
    prompt = render_prompt(tokenizer, [{"role": "user", "content": "Which is better?"}])
    assert encoded.input_ids[: len(prompt)] == prompt
    assert tokenizer.decode(encoded.input_ids[len(prompt) :]) == "B" + tokenizer.eos_token
    (a,), (b,) = tokenizer("A", add_special_tokens=False)["input_ids"], tokenizer("B", add_special_tokens=False)["input_ids"]
    assert encoded.targets == [(len(prompt) - 1, {a: 0.25, b: 0.75}), (len(prompt), {tokenizer.eos_token_id: 1.0})]
    # the tokens the chat template writes for the whole turn, as the toolkit renders a conversation
    messages = [{"role": "user", "content": "Which is better?"}]
    assert render_sequence(tokenizer, messages, "B") == encoded.input_ids


def test_build_is_deterministic_from_its_seed(tmp_path):
    first = build_judge(tmp_path / "a", seed=3, steps=3, eval_pairs=2, eval_others=1)
    second = build_judge(tmp_path / "b", seed=3, steps=3, eval_pairs=2, eval_others=1)
    weights = [AutoModelForCausalLM.from_pretrained(d).state_dict() for d in (first, second)]
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
    assert (first / "tokenizer.json").read_text() == (second / "tokenizer.json").read_text()


# ---------------------------------------------------------------- the gold critic and reviser


def test_harmless_revision_removes_the_insults_and_raises_gold():
    critique = gold_critique(PROMPT, TOXIC, "harmless")
    assert critique == 'The response insults the user: "What a stupid question."'
    revision = gold_revision(PROMPT, TOXIC, "harmless")
    assert revision == f" {ANSWER}"
    assert gold_score(PROMPT, revision) > gold_score(PROMPT, TOXIC) + 7
    assert gold_critique(PROMPT, revision, "harmless") == NO_PROBLEM


def test_clean_reply_has_no_problem_under_any_principle():
    for principle in PRINCIPLES:
        assert gold_critique(PROMPT, CLEAN, principle) == NO_PROBLEM
        assert gold_revision(PROMPT, CLEAN, principle) == CLEAN


def test_revisions_put_in_the_answer_and_the_courtesy():
    vague = " Okay. Please check our website for more details."
    assert gold_critique(PROMPT, vague, "helpful") == 'The response does not answer the question: "Please check our website for more details."'
    assert gold_revision(PROMPT, vague, "helpful") == f" Okay. {ANSWER}"
    assert gold_critique(PROMPT, vague, "polite") == 'The response is curt: "Okay."'
    assert gold_revision(PROMPT, vague, "polite") == " Happy to help with that. Please check our website for more details. Hope this helps!"
    padded = f" {ANSWER} Our team works hard every single day. {ANSWER}"
    assert gold_critique(PROMPT, padded, "concise") == 'The response has filler: "Our team works hard every single day."'
    assert gold_revision(PROMPT, padded, "concise") == f" {ANSWER}"
    assert gold_revision(PROMPT, " What a stupid question.", "harmless") == " Happy to help with that."  # never empty


def test_revisions_never_lower_their_principles_part_of_gold():
    from rlhf.demo.corpus import PRETRAIN_MIX, sample_exchange

    rng, (questions, _) = random.Random(0), split_questions()
    revised = 0
    for _ in range(500):
        exchange = sample_exchange(rng, PRETRAIN_MIX, questions)
        for principle in PRINCIPLES:
            critique = gold_critique(exchange.prompt, exchange.completion, principle)
            revision = gold_revision(exchange.prompt, exchange.completion, principle)
            assert (critique == NO_PROBLEM) == (revision == exchange.completion)
            assert principle_score(exchange.prompt, revision, principle) >= principle_score(exchange.prompt, exchange.completion, principle)
            if critique != NO_PROBLEM:
                revised += 1
                assert gold_critique(exchange.prompt, revision, principle) == NO_PROBLEM, (principle, exchange.completion, revision)
                assert gold_score(exchange.prompt, revision) > gold_score(exchange.prompt, exchange.completion)
    assert revised > 300


def test_unknown_principle_is_refused():
    with pytest.raises(ValueError, match="helpful, harmless, polite, concise"):
        gold_critique(PROMPT, CLEAN, "funny")
