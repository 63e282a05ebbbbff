"""Conversations render the same way in every stage: SFT targets, reward-model training and
scoring, PPO and eval rollouts; string prompts keep the token ids they always had."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import QWEN_TEMPLATE, TOPICS, chat_tokenizer, conversation_for, good_reply, write_jsonl
from rlhf import evaluation, ppo, reward, rl, rollout
from rlhf.config import ConfigError
from rlhf.data import Comparison, DataError, Demonstration, Prompt, Rating
from rlhf.encoding import IGNORE, encode_demonstration, encode_prompt, encode_prompts, render_prompt, use_chat_template
from rlhf.models import load_sequence_classifier, load_tokenizer
from rlhf.sampling import SamplingConfig
from rlhf.scoring import RewardSourceConfig, SequenceClassifierScore

DEMO_MODEL = Path(__file__).resolve().parents[1] / "rlhf" / "demo" / "base_model"
GENERATION_PROMPT = "<|im_start|>assistant\n"


def tokens(tokenizer, ids: list[int]) -> list[str]:
    return tokenizer.convert_ids_to_tokens(ids)


@pytest.fixture(scope="module")
def instruct(chat_model_dir):
    return load_tokenizer(str(chat_model_dir))


def test_sft_targets_end_with_one_turn_end(instruct):
    reply = "Refunds reach your card within five days."
    demos = [
        Demonstration("", "", "c.jsonl:1", conversation_for("refund") + [{"role": "assistant", "content": reply}]),
        Demonstration(conversation_for("refund"), [{"role": "assistant", "content": reply}], "c.jsonl:2"),
    ]
    for demo in demos:
        input_ids, labels = encode_demonstration(instruct, demo, 128)
        text = instruct.decode(input_ids)
        assert text.endswith(f"{GENERATION_PROMPT}{reply}<|im_end|>"), text  # no "\n<|im_end|>" after it
        assert text.count("<|im_end|>") == 3  # system, user, assistant
        assert instruct.decode([t for t, label in zip(input_ids, labels) if label != IGNORE]) == reply + "<|im_end|>"
    a, b = (encode_demonstration(instruct, demo, 128) for demo in demos)
    assert a == b  # {messages} and conversational {prompt, completion} are the same example


def test_every_assistant_turn_is_trained_through_its_turn_end(instruct):
    messages = [
        {"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"},
        {"role": "user", "content": "bye"}, {"role": "assistant", "content": "ciao"},
    ]
    input_ids, labels = encode_demonstration(instruct, Demonstration("", "", "c.jsonl:1", messages), 128)
    trained = [t for t, label in zip(input_ids, labels) if label != IGNORE]
    assert instruct.decode(trained) == "hello<|im_end|>ciao<|im_end|>"
    assert instruct.decode(input_ids).endswith("ciao<|im_end|>")


def test_base_tokenizer_stops_at_the_templates_turn_end():
    # EOS <|endoftext|>, turns closed by <|im_end|>: the turn end is the stop token, no EOS after it.
    base = chat_tokenizer(eos="<|endoftext|>")
    prompt = conversation_for("refund")
    example = reward.encode_feedback(base, Rating(prompt, "Five days.", 1.0, "r.jsonl:1"), 128)
    assert base.decode(example.sequences[0]).endswith(f"{GENERATION_PROMPT}Five days.<|im_end|>")


def test_a_template_without_a_turn_end_gets_eos(instruct, tmp_path):
    template = tmp_path / "plain.jinja"
    template.write_text("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}{% if add_generation_prompt %}assistant:{% endif %}")
    tokenizer = chat_tokenizer()
    use_chat_template(tokenizer, str(template))
    demo = Demonstration(conversation_for("refund"), "Five days.", "c.jsonl:1")
    input_ids, labels = encode_demonstration(tokenizer, demo, 128)
    assert tokenizer.decode(input_ids) == "user: How do I get help with my refund?\nassistant: Five days.\n<|im_end|>"
    assert labels[-1] == tokenizer.eos_token_id


def test_a_template_that_renders_the_prompt_otherwise_in_the_conversation_is_an_error(tmp_path):
    # The generation prompt says "Assistant:", the rendered turn "assistant:": no prefix to cut at.
    template = tmp_path / "uneven.jinja"
    template.write_text("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}{% if add_generation_prompt %}Assistant:{% endif %}")
    tokenizer = chat_tokenizer()
    use_chat_template(tokenizer, str(template))
    with pytest.raises(DataError, match=r"^c.jsonl:4: field 'completion': the chat template does not render the prompt"):
        encode_demonstration(tokenizer, Demonstration(conversation_for("refund"), "Five days.", "c.jsonl:4"), 128)
    messages = conversation_for("refund") + [{"role": "assistant", "content": "Five days."}]
    with pytest.raises(DataError, match=r"^c.jsonl:5: field 'messages\[1\]': the chat template does not render the conversation before this turn"):
        encode_demonstration(tokenizer, Demonstration("", "", "c.jsonl:5", messages), 128)


# Qwen3's shape: the last assistant turn, after the last user turn, opens with an empty thinking
# block; earlier turns are rendered without it, so a turn alone is no prefix of the whole.
THINKING_TEMPLATE = (
    "{% set ns = namespace(last_user=0) %}{% for m in messages %}{% if m['role'] == 'user' %}{% set ns.last_user = loop.index0 %}{% endif %}{% endfor %}"
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' }}"
    "{% if m['role'] == 'assistant' and loop.index0 > ns.last_user %}{{ '<think>\\n\\n</think>\\n\\n' }}{% endif %}"
    "{{ m['content'] + '<|im_end|>\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def test_multi_turn_sft_on_a_template_that_renders_the_last_turn_otherwise():
    tokenizer = chat_tokenizer()
    tokenizer.chat_template = THINKING_TEMPLATE
    messages = [
        {"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"},
        {"role": "user", "content": "bye"}, {"role": "assistant", "content": "ciao"},
    ]
    input_ids, labels = encode_demonstration(tokenizer, Demonstration("", "", "c.jsonl:1", messages), 128)
    trained = tokenizer.decode([t for t, label in zip(input_ids, labels) if label != IGNORE])
    assert trained == "hello<|im_end|><think>\n\n</think>\n\nciao<|im_end|>"
    assert tokenizer.decode(input_ids).endswith("ciao<|im_end|>")


def test_what_a_template_writes_after_the_last_turn_end_is_not_trained_on():
    # Phi-3's shape: EOS after the whole conversation, behind the turn end <|im_end|>.
    tokenizer = chat_tokenizer(eos="<|endoftext|>")
    tokenizer.chat_template = QWEN_TEMPLATE + "{% if not add_generation_prompt %}{{ eos_token }}{% endif %}"
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    input_ids, labels = encode_demonstration(tokenizer, Demonstration("", "", "c.jsonl:1", messages), 128)
    assert tokenizer.decode([t for t, label in zip(input_ids, labels) if label != IGNORE]) == "hello<|im_end|>"
    assert tokenizer.eos_token_id not in input_ids


def test_a_template_that_refuses_a_conversation_is_a_data_error():
    tokenizer = chat_tokenizer()
    tokenizer.chat_template = "{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}" + QWEN_TEMPLATE
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    with pytest.raises(DataError, match=r"^c.jsonl:2: field 'messages': the chat template refuses it: System role not supported$"):
        encode_demonstration(tokenizer, Demonstration("", "", "c.jsonl:2", messages), 128)
    with pytest.raises(DataError, match=r"^p.jsonl:3: field 'prompt': the chat template refuses it"):
        encode_prompt(tokenizer, messages[:2], 128, "p.jsonl:3")


def test_chat_template_none_renders_plain_turns_whatever_the_tokenizer_has():
    tokenizer = chat_tokenizer()
    use_chat_template(tokenizer, "none")
    assert tokenizer.decode(render_prompt(tokenizer, conversation_for("refund"))) == "User: How do I get help with my refund?\nAssistant:"


def test_the_tool_role_reaches_the_template(instruct):
    messages = [
        {"role": "user", "content": "Where is my parcel?"},
        {"role": "assistant", "content": "Let me look it up."},
        {"role": "tool", "content": "in transit"},
        {"role": "assistant", "content": "It is on its way."},
    ]
    input_ids, _ = encode_demonstration(instruct, Demonstration("", "", "t.jsonl:1", messages), 128)
    assert "<|im_start|>user\n<tool_response>\nin transit\n</tool_response><|im_end|>" in instruct.decode(input_ids)


def test_rollout_prompts_end_with_the_generation_prompt_as_in_sft(instruct):
    conversation = conversation_for("refund")
    records, (ids,) = encode_prompts(instruct, [Prompt(conversation, "p.jsonl:1")], 128, skip_invalid=False)
    assert instruct.decode(ids).endswith("How do I get help with my refund?<|im_end|>\n" + GENERATION_PROMPT)
    sft_ids, labels = encode_demonstration(instruct, Demonstration(conversation, "Five days.", "c.jsonl:1"), 128)
    start = next(i for i, label in enumerate(labels) if label != IGNORE)
    assert sft_ids[:start] == ids


@pytest.mark.parametrize("eos", ["<|im_end|>", "<|endoftext|>"])
def test_reward_training_and_scoring_build_the_same_sequences(chat_model_dir, eos):
    tokenizer = chat_tokenizer(eos)
    model = load_sequence_classifier(str(chat_model_dir), load_tokenizer(str(chat_model_dir)), num_labels=1)
    scorer = SequenceClassifierScore(model, tokenizer)
    prompt = conversation_for("refund")
    chosen, rejected = good_reply("refund").strip(), "Whatever."
    pair = Comparison(prompt, [[{"role": "assistant", "content": chosen}], [{"role": "assistant", "content": rejected}]], "p.jsonl:1")
    trained = reward.encode_feedback(tokenizer, pair, 128).sequences
    # PPO hands the reward source the prompt record and the decoded completion text.
    assert [scorer.encode(prompt, text) for text in (chosen, rejected)] == trained
    assert [scorer.encode(prompt, c) for c in pair.completions] == trained
    assert tokens(tokenizer, trained[0][-2:]) == [".", "<|im_end|>"]
    rating = Rating(prompt, chosen, 1.0, "r.jsonl:1")
    assert reward.encode_feedback(tokenizer, rating, 128).sequences == [scorer.encode(prompt, chosen)]


def test_string_prompts_keep_their_token_ids():
    # The demo's tokenizer has no chat template: prompt ids, then completion ids, then EOS.
    tokenizer = load_tokenizer(str(DEMO_MODEL))
    prompt, completion = "User: How do I get help with my refund?\nAssistant:", " Refunds reach your card within five days."
    expected_prompt = tokenizer(prompt)["input_ids"]
    expected = expected_prompt + tokenizer(completion, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    assert render_prompt(tokenizer, prompt) == expected_prompt
    assert encode_prompts(tokenizer, [Prompt(prompt, "p.jsonl:1")], 512, False)[1] == [expected_prompt]
    assert encode_demonstration(tokenizer, Demonstration(prompt, completion, "d.jsonl:1"), 512)[0] == expected
    pair = Comparison(prompt, [completion, " Whatever."], "p.jsonl:1")
    assert reward.encode_feedback(tokenizer, pair, 512).sequences[0] == expected
    model = load_sequence_classifier(str(DEMO_MODEL), tokenizer, num_labels=1)
    assert SequenceClassifierScore(model, tokenizer).encode(prompt, completion) == expected


def test_a_conversational_completion_needs_a_conversational_prompt(instruct):
    with pytest.raises(DataError, match=r"^p.jsonl:3: field 'chosen': a list of messages needs a conversational prompt"):
        reward.encode_feedback(instruct, Comparison("Hi?", [[{"role": "assistant", "content": "x"}], "y"], "p.jsonl:3"), 128)


@pytest.mark.parametrize("chat_template", ["auto", "none"])
def test_ppo_and_eval_roll_out_on_the_rendered_conversation(chat_model_dir, tmp_path, monkeypatch, chat_template):
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": conversation_for(t)} for t in TOPICS])
    tokenizer = load_tokenizer(str(chat_model_dir))
    generation_prompt = tokenizer(GENERATION_PROMPT if chat_template == "auto" else "\nAssistant:", add_special_tokens=False)["input_ids"]
    seen: dict[str, list] = {"ppo": [], "eval": []}
    for module, key in ((rollout, "ppo"), (evaluation, "eval")):
        name = "sample_with_logprobs"
        original = getattr(module, name)

        def spy(model, prompt_ids, *args, _original=original, _key=key, **kwargs):
            seen[_key].extend(prompt_ids)
            return _original(model, prompt_ids, *args, **kwargs)

        monkeypatch.setattr(module, name, spy)
    config = ppo.PPOConfig(
        policy=str(chat_model_dir), output_dir=str(tmp_path / "ppo"), prompts=rl.PromptData(train=[str(prompts)]),
        reward=RewardSourceConfig(kind="function", path="test_chat:record_reward"),
        generation=SamplingConfig(max_new_tokens=4), algo=ppo.PPOAlgoConfig(batch_size=4, minibatch_size=4, micro_batch_size=4, epochs=1),
        stop=rl.StopConfig(max_steps=1), precision="fp32", chat_template=chat_template,
    )
    RECEIVED.clear()
    ppo.train(config)
    evaluation.evaluate(evaluation.EvalConfig(
        reference=str(chat_model_dir), prompts=[str(prompts)], generation=SamplingConfig(max_new_tokens=4),
        output_dir=str(tmp_path / "eval"), batch_size=4, chat_template=chat_template,
    ))
    for key in ("ppo", "eval"):
        assert len(seen[key]) == len(TOPICS)
        assert all(ids[-len(generation_prompt) :] == generation_prompt for ids in seen[key]), key
    # The reward function gets the conversation and TRL's conversational completions.
    assert {json.dumps(p) for p in RECEIVED["prompts"]} == {json.dumps(conversation_for(t)) for t in TOPICS}
    assert all(c[0]["role"] == "assistant" for c in RECEIVED["completions"])
    sample = json.loads((tmp_path / "ppo" / "samples.jsonl").read_text().splitlines()[0])
    assert isinstance(sample["prompt"], list)
    row = json.loads((tmp_path / "eval" / "samples.jsonl").read_text().splitlines()[0])
    assert isinstance(row["prompt"], list)


RECEIVED: dict[str, list] = {}


def record_reward(prompts, completions, **kwargs):
    RECEIVED.setdefault("prompts", []).extend(prompts)
    RECEIVED.setdefault("completions", []).extend(completions)
    return [0.0] * len(prompts)


def test_sft_and_reward_models_keep_the_template_they_were_trained_with(chat_model_dir, tmp_path):
    from rlhf import sft
    from transformers import AutoTokenizer

    template = tmp_path / "plain.jinja"
    template.write_text("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}{% if add_generation_prompt %}assistant:{% endif %}")
    turn = [{"role": "assistant", "content": "Five days."}]
    demos = write_jsonl(tmp_path / "sft.jsonl", [{"prompt": conversation_for(t), "completion": turn} for t in TOPICS for _ in range(2)])
    prefs = write_jsonl(tmp_path / "prefs.jsonl", [{"prompt": conversation_for(t), "chosen": turn, "rejected": "No."} for t in TOPICS for _ in range(2)])
    optim = sft.OptimConfig(batch_size=4, micro_batch_size=4, max_steps=1)
    saved = [
        sft.train(sft.SFTConfig(model=str(chat_model_dir), output_dir=str(tmp_path / "sft"), data=sft.DataConfig(train=[str(demos)]),
                                optim=optim, precision="fp32", chat_template=str(template))),
        reward.train(reward.RewardConfig(model=str(chat_model_dir), output_dir=str(tmp_path / "rm"), data=reward.DataConfig(train=[str(prefs)], eval_fraction=0.25),
                                         optim=optim, precision="fp32", chat_template=str(template))),
    ]
    for path in saved:
        assert AutoTokenizer.from_pretrained(path).chat_template == template.read_text()


def test_a_chat_template_path_that_does_not_exist_is_refused_before_work(tiny_model_dir, tiny_data, tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "rlhf", "sft", f"sft.model={tiny_model_dir}", f"sft.data.train=[{tiny_data['sft']}]",
         f"sft.output_dir={tmp_path / 'sft'}", "sft.chat_template=templates/missing.jinja"],
        capture_output=True, text=True,
    )
    assert result.returncode == 2, result.stderr
    assert "error: sft.chat_template: templates/missing.jinja is not a file" in result.stderr
    assert not (tmp_path / "sft").exists()
    model, short = str(tiny_model_dir), SamplingConfig(max_new_tokens=8)
    stages = [
        ("reward", lambda: reward.validate(reward.RewardConfig(model=model, data=reward.DataConfig(train=["p.jsonl"]), chat_template="x.jinja"), 1)),
        ("ppo", lambda: ppo.validate(ppo.PPOConfig(
            policy=model, prompts=rl.PromptData(train=["p.jsonl"]), generation=short,
            reward=RewardSourceConfig(kind="function", path="conftest:length_reward"), chat_template="x.jinja"), 1)),
        ("eval", lambda: evaluation.validate(evaluation.EvalConfig(reference=model, prompts=["p.jsonl"], generation=short, chat_template="x.jinja"))),
    ]
    for stage, check in stages:
        with pytest.raises(ConfigError, match=rf"^{stage}\.chat_template: x.jinja is not a file"):
            check()


def bos_tokenizer():
    """A base tokenizer that puts <s> before every text it encodes (as Llama's and Mistral's do),
    with no chat template of its own."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<s>", "</s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    bpe.train_from_iterator(["User: hi\nAssistant: hello"] * 10, trainer)
    bpe.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", bpe.token_to_id("<s>"))])
    return PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<s>", eos_token="</s>")


def test_a_conversation_on_the_plain_template_starts_with_bos_as_a_string_prompt_does():
    tokenizer = bos_tokenizer()
    bos = tokenizer.bos_token_id
    string = render_prompt(tokenizer, "User: hi\nAssistant:")
    conversation = render_prompt(tokenizer, [{"role": "user", "content": "hi"}])
    assert string[0] == bos and conversation == string  # the same text, the same ids
    demo = Demonstration("", "", "c.jsonl:1", [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}])
    input_ids, _ = encode_demonstration(tokenizer, demo, 64)
    assert input_ids[0] == bos and input_ids.count(bos) == 1
