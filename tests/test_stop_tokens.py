"""Stop tokens: the set a response ends at, from the tokenizer, its chat template and the
generation config, and the generation config's EOS list kept through loading and saving."""

from __future__ import annotations

import json
import logging

import pytest
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import GenerationConfig, PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

from conftest import TURN_END_TEMPLATE, turn_end_tokenizer
from rlhf.models import load_causal_lm, load_tokenizer, save_model, stop_token_ids, turn_end_ids

# The shape of Llama-3's template: a turn is "<|start_header_id|>role<|end_header_id|>\n\ncontent<|eot_id|>".
LLAMA3_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim + '<|eot_id|>' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
)
LLAMA3_SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eom_id|>", "<|eot_id|>"]


def llama3_tokenizer():
    """A word-level tokenizer with Llama-3's special tokens and template shape: EOS <|end_of_text|>, turns closed by <|eot_id|>."""
    words = ["<unk>", "user", "assistant", "hello", "Sure"]
    word_level = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    word_level.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=word_level, unk_token="<unk>", bos_token="<|begin_of_text|>", eos_token="<|end_of_text|>")
    tokenizer.add_special_tokens({"additional_special_tokens": LLAMA3_SPECIALS[2:]})
    tokenizer.chat_template = LLAMA3_TEMPLATE
    return tokenizer


def ids(tokenizer, *tokens: str) -> list[int]:
    return sorted(tokenizer.convert_tokens_to_ids(list(tokens)))


def test_a_qwen_style_tokenizer_stops_at_its_eos_and_at_the_end_of_turn_of_its_template():
    tokenizer = turn_end_tokenizer()  # eos <|endoftext|>, turns closed by "<|im_end|>\n", no pad
    assert tokenizer.pad_token_id is None
    assert turn_end_ids(tokenizer) == ids(tokenizer, "<|im_end|>")
    base = GenerationConfig(eos_token_id=tokenizer.eos_token_id)  # a base model's: <|endoftext|> alone
    assert stop_token_ids(tokenizer, base) == ids(tokenizer, "<|endoftext|>", "<|im_end|>")
    assert stop_token_ids(tokenizer) == ids(tokenizer, "<|endoftext|>", "<|im_end|>")
    tokenizer.chat_template = None
    assert stop_token_ids(tokenizer, base) == ids(tokenizer, "<|endoftext|>")


def test_a_llama3_style_tokenizer_adds_every_id_of_the_generation_configs_list():
    tokenizer = llama3_tokenizer()
    assert turn_end_ids(tokenizer) == ids(tokenizer, "<|eot_id|>")
    # Llama-3.1-Instruct lists <|eom_id|> too: no other source names it
    listed = GenerationConfig(eos_token_id=tokenizer.convert_tokens_to_ids(["<|end_of_text|>", "<|eom_id|>", "<|eot_id|>"]))
    assert stop_token_ids(tokenizer, listed) == ids(tokenizer, "<|end_of_text|>", "<|eom_id|>", "<|eot_id|>")
    tokenizer.chat_template = None
    assert stop_token_ids(tokenizer, listed) == ids(tokenizer, "<|end_of_text|>", "<|eom_id|>", "<|eot_id|>")
    assert stop_token_ids(tokenizer, GenerationConfig(eos_token_id=None)) == ids(tokenizer, "<|end_of_text|>")


def test_the_pad_token_is_never_a_stop_token():
    # Qwen2.5-Instruct: eos <|im_end|>, pad <|endoftext|>, and both in the generation config's list
    tokenizer = turn_end_tokenizer()
    tokenizer.eos_token, tokenizer.pad_token = "<|im_end|>", "<|endoftext|>"
    listed = GenerationConfig(eos_token_id=tokenizer.convert_tokens_to_ids(["<|im_end|>", "<|endoftext|>"]))
    assert stop_token_ids(tokenizer, listed) == ids(tokenizer, "<|im_end|>")


def qwen2_dir(path, tokenizer, eos_token_id: list[int]):
    """A tiny random Qwen2 whose config and generation config list `eos_token_id`, as Qwen2.5-Instruct's do."""
    config = Qwen2Config(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=64, eos_token_id=eos_token_id,
    )
    model = Qwen2ForCausalLM(config)
    model.generation_config = GenerationConfig(eos_token_id=eos_token_id)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.mark.parametrize("listed", [["<|im_end|>", "<|endoftext|>"], ["<|im_end|>"]])
def test_loading_and_saving_keep_the_eos_list(listed, tmp_path):
    tokenizer = turn_end_tokenizer()  # eos <|endoftext|>
    listed_ids = tokenizer.convert_tokens_to_ids(listed)
    path = qwen2_dir(tmp_path / "base", tokenizer, listed_ids)
    tokenizer = load_tokenizer(str(path))
    model = load_causal_lm(str(path), tokenizer)
    saved = save_model(model, tokenizer, tmp_path / "saved")
    # the list as it was, with the tokenizer's EOS added where it was missing
    expected = tokenizer.convert_tokens_to_ids(["<|im_end|>", "<|endoftext|>"])
    assert json.loads((saved / "generation_config.json").read_text())["eos_token_id"] == expected
    assert json.loads((saved / "config.json").read_text())["eos_token_id"] == expected
    assert stop_token_ids(tokenizer, load_causal_lm(str(saved), load_tokenizer(str(saved)))) == sorted(expected)


def test_a_pad_token_the_generation_config_lists_as_eos_is_replaced(tmp_path):
    # Qwen2.5-Instruct: eos <|im_end|>, pad <|endoftext|>, and the generation config stops at both
    tokenizer = turn_end_tokenizer()
    tokenizer.eos_token, tokenizer.pad_token = "<|im_end|>", "<|endoftext|>"
    listed = tokenizer.convert_tokens_to_ids(["<|im_end|>", "<|endoftext|>"])
    path = qwen2_dir(tmp_path / "instruct", tokenizer, listed)
    loaded = load_tokenizer(str(path))
    assert loaded.pad_token_id not in listed
    assert stop_token_ids(loaded, load_causal_lm(str(path), loaded)) == sorted(listed)  # <|endoftext|> stops again


def test_the_turn_end_is_found_once_per_template(caplog):
    # PPO asks at every step: a template that refuses the probe is reported once, and a new
    # template is probed again.
    tokenizer = turn_end_tokenizer()
    turn_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert turn_end_ids(tokenizer) == [turn_end]
    tokenizer.chat_template = "{{ raise_exception('a system turn is required') }}"
    with caplog.at_level(logging.WARNING, logger="rlhf.models"):
        assert [turn_end_ids(tokenizer) for _ in range(3)] == [[], [], []]
    assert caplog.text.count("a system turn is required") == 1
    tokenizer.chat_template = TURN_END_TEMPLATE
    assert turn_end_ids(tokenizer) == [turn_end]
