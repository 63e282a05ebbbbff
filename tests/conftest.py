"""Shared fixtures: a tiny tokenizer and GPT-2 model built locally in a second, a tiny chat model
with a Qwen-style template, and small data."""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"  # the tests never reach a hub: every model is built here
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as rlhf/__init__.py; set before torch loads

import pytest  # noqa: E402
import transformers  # noqa: E402

transformers.logging.set_verbosity_error()
transformers.logging.disable_progress_bar()

TOPICS = {
    "password": "Click forgot password on the login page.",
    "refund": "Refunds reach your card within five days.",
    "shipping": "Standard shipping takes three days.",
    "invoice": "Invoices are on your account page.",
}


def prompt_for(topic: str) -> str:
    return f"User: How do I get help with my {topic}?\nAssistant:"


def good_reply(topic: str) -> str:
    return f" {TOPICS[topic]} Happy to help."


def bad_reply(topic: str, rng: random.Random) -> str:
    other = rng.choice([t for t in TOPICS if t != topic])
    return f" {TOPICS[other]} Whatever."


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A randomly initialised 2-layer GPT-2 with a byte-level BPE tokenizer and no pad token."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast
    import torch

    rng = random.Random(0)
    texts = [prompt_for(t) + rng.choice([good_reply(t), bad_reply(t, rng)]) for t in TOPICS for _ in range(20)]
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    bpe.train_from_iterator(texts, trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|endoftext|>", bos_token="<|endoftext|>")
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=len(tokenizer), n_positions=64, n_embd=64, n_layer=2, n_head=2, bos_token_id=0, eos_token_id=0)
    path = tmp_path_factory.mktemp("tiny") / "base"
    GPT2LMHeadModel(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


# The shape of Qwen2.5's template: a turn is "<|im_start|>role\ncontent<|im_end|>\n".
TURN_END_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
TURN_END_TEXTS = ["hello", "hello world", "how do I get a refund?", "thanks", "user", "assistant", "system"]


def turn_end_tokenizer(texts: list[str] = TURN_END_TEXTS, vocab_size: int = 300):
    """A Qwen2 tokenizer over a byte-level BPE trained on a few words: EOS <|endoftext|>, turns
    closed by <|im_end|>, no pad token (the class transformers loads for a Qwen2 checkpoint)."""
    import json

    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import Qwen2Tokenizer

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    bpe.train_from_iterator(texts * 10, trainer)
    model = json.loads(bpe.to_str())["model"]
    tokenizer = Qwen2Tokenizer(vocab=model["vocab"], merges=[tuple(m) for m in model["merges"]], eos_token="<|endoftext|>", pad_token=None)
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tokenizer.chat_template = TURN_END_TEMPLATE
    return tokenizer


def turn_end_prompt(text: str) -> str:
    """A user turn and the start of the assistant's, as the chat template renders them."""
    return f"<|im_start|>user\n{text}<|im_end|>\n<|im_start|>assistant\n"


@pytest.fixture(scope="session")
def turn_end_model_dir(tmp_path_factory) -> Path:
    """A 2-layer Qwen2 that answers a prompt with <|im_end|>, the chat template's end of turn, and
    says " world" after it; a prompt that ends in "assistant" (no newline after it) it answers
    with "hello" first. Its tokenizer's EOS and its generation config's are <|endoftext|> (as a
    Qwen base model's), so only the template says that <|im_end|> ends a reply.

    The layers add nothing to the residual stream (zero output projections) and the embeddings
    are three unit vectors, one for <|im_end|>, one for "assistant" and one for every other token,
    so the logits depend on the last token alone: 10 * sqrt(32) ~ 57 nats on its successor, 0
    elsewhere."""
    import torch
    from transformers import GenerationConfig, Qwen2Config, Qwen2ForCausalLM

    tokenizer = turn_end_tokenizer()
    eos, turn_end, world, assistant, hello = tokenizer.convert_tokens_to_ids(["<|endoftext|>", "<|im_end|>", "Ġworld", "assistant", "hello"])
    config = Qwen2Config(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=128, tie_word_embeddings=False, bos_token_id=None, eos_token_id=eos,
    )
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(config)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        embeddings, head = model.model.embed_tokens.weight, model.lm_head.weight
        embeddings.zero_()
        embeddings[:, 0] = 1.0
        embeddings[turn_end], embeddings[assistant] = torch.eye(32)[1], torch.eye(32)[2]
        head.zero_()
        head[turn_end, 0], head[world, 1], head[hello, 2] = 10.0, 10.0, 10.0  # ("assistant" -> "hello" ->) <|im_end|> -> " world"
    model.generation_config = GenerationConfig(eos_token_id=eos)
    path = tmp_path_factory.mktemp("chat") / "model"
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def turn_end_prompts(tmp_path_factory) -> Path:
    """Four prompts for `turn_end_model_dir`: three answered by <|im_end|>, the last by "hello<|im_end|>"."""
    root = tmp_path_factory.mktemp("chat_prompts")
    prompts = [turn_end_prompt(t) for t in ("hello", "how do I get a refund?", "thanks")] + [turn_end_prompt("hello world").rstrip("\n")]
    return write_jsonl(root / "prompts.jsonl", [{"prompt": p} for p in prompts])


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> dict[str, Path]:
    """Demonstrations and pairwise preferences where the right-topic polite reply is better."""
    rng = random.Random(1)
    root = tmp_path_factory.mktemp("data")
    demos, prefs = [], []
    for _ in range(128):
        topic = rng.choice(list(TOPICS))
        demos.append({"prompt": prompt_for(topic), "completion": good_reply(topic)})
        prefs.append({"prompt": prompt_for(topic), "chosen": good_reply(topic), "rejected": bad_reply(topic, rng), "labeler": "t"})
    return {"sft": write_jsonl(root / "sft.jsonl", demos), "prefs": write_jsonl(root / "prefs.jsonl", prefs)}


def length_reward(prompts, completions, **kwargs):
    """A Python-function reward source for tests: the completion's length."""
    return [len(c) for c in completions]


def polite_reward(prompts, completions, **kwargs):
    """The learning test's reward: +1 for a polite close, -1 for a rude one."""
    return [("Happy to help" in c) - ("Whatever" in c) for c in completions]


@pytest.fixture(scope="session")
def tiny_sft_dir(tiny_model_dir, tmp_path_factory) -> Path:
    """The tiny model fine-tuned on replies that close politely half the time and rudely otherwise."""
    from rlhf import sft

    rng = random.Random(6)
    root = tmp_path_factory.mktemp("sft")
    demos = []
    for _ in range(256):
        topic = rng.choice(list(TOPICS))
        demos.append({"prompt": prompt_for(topic), "completion": good_reply(topic) if rng.random() < 0.5 else f" {TOPICS[topic]} Whatever."})
    config = sft.SFTConfig(
        model=str(tiny_model_dir),
        output_dir=str(root / "run"),
        data=sft.DataConfig(train=[str(write_jsonl(root / "mixed.jsonl", demos))]),
        optim=sft.OptimConfig(lr=3e-3, batch_size=16, micro_batch_size=16, epochs=8),
        eval_every=1000,
        precision="fp32",
    )
    return sft.train(config)


@pytest.fixture(scope="session")
def tiny_prompts(tmp_path_factory) -> Path:
    rng = random.Random(4)
    root = tmp_path_factory.mktemp("prompts")
    return write_jsonl(root / "prompts.jsonl", [{"prompt": prompt_for(rng.choice(list(TOPICS)))} for _ in range(64)])


def word_count_reward(prompts, completions, **kwargs):
    """A reward that can be gamed without limit: one point per word, whatever the words."""
    return [float(len(c.split())) for c in completions]


def constant_reward_model(base: Path, path: Path, score: float, band: list[float]) -> Path:
    """A reward model on `base` whose head is zeros: every logit 0, every score its stored bias,
    `score`, with `band` stored as its held-out score band."""
    import torch

    from rlhf.models import load_sequence_classifier, load_tokenizer, score_head

    tokenizer = load_tokenizer(str(base))
    model = load_sequence_classifier(str(base), tokenizer, num_labels=1)
    torch.nn.init.zeros_(score_head(model).weight)
    model.config.reward_bias, model.config.reward_score_band = score, band
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def brevity_reward(prompts, completions, **kwargs):
    """A reward that the same answer to every prompt earns: minus one point per word."""
    return [-float(len(c.split())) for c in completions]


# ---------------------------------------------------------------- a chat model, Qwen-style

# Qwen2.5's template, reduced to what it does with messages: a default system turn, ChatML
# turns closed by <|im_end|> and a newline, tool results inside a user turn.
QWEN_TEMPLATE = (
    "{%- if messages[0]['role'] == 'system' %}"
    "{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}"
    "{%- else %}{{- '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}{%- endif %}"
    "{%- for message in messages %}"
    "{%- if message['role'] == 'system' and loop.first %}"
    "{%- elif message['role'] == 'tool' %}"
    "{{- '<|im_start|>user\\n<tool_response>\\n' + message['content'] + '\\n</tool_response><|im_end|>\\n' }}"
    "{%- else %}{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


def conversation_for(topic: str) -> list[dict]:
    return [{"role": "user", "content": f"How do I get help with my {topic}?"}]


def chat_tokenizer(eos: str = "<|im_end|>"):
    """A byte-level BPE tokenizer with Qwen's special tokens and chat template; EOS `<|im_end|>`
    as in the instruct models, or `<|endoftext|>` as in the base ones."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    rng = random.Random(0)
    texts = [f"system\nYou are a helpful assistant.\nuser\nHow do I get help with my {t}?\nassistant\n"
             + rng.choice([good_reply(t), bad_reply(t, rng)]) for t in TOPICS for _ in range(20)]
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    trainer = trainers.BpeTrainer(vocab_size=500, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    bpe.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=bpe, eos_token=eos, pad_token="<|endoftext|>", additional_special_tokens=specials[1:], chat_template=QWEN_TEMPLATE
    )


@pytest.fixture(scope="session")
def chat_model_dir(tmp_path_factory) -> Path:
    """A randomly initialised 2-layer GPT-2 with the instruct chat tokenizer (EOS <|im_end|>)."""
    from transformers import GPT2Config, GPT2LMHeadModel
    import torch

    tokenizer = chat_tokenizer()
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=len(tokenizer), n_positions=128, n_embd=64, n_layer=2, n_head=2,
                        bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id)
    path = tmp_path_factory.mktemp("chat") / "base"
    GPT2LMHeadModel(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


# ---------------------------------------------------------------- every supported architecture

LLAMA_LIKE = dict(intermediate_size=64, num_key_value_heads=2)  # grouped-query attention
# The transformers class prefix of each architecture the project supports besides GPT-2, and
# what its tiny model sets beyond the sizes every one shares.
ARCHITECTURES = {
    "llama": ("Llama", LLAMA_LIKE),
    "qwen2": ("Qwen2", LLAMA_LIKE),
    "qwen3": ("Qwen3", dict(LLAMA_LIKE, head_dim=8)),  # norms on queries and keys
    "mistral": ("Mistral", dict(LLAMA_LIKE, sliding_window=8)),  # responses run past the window
    "gemma2": ("Gemma2", dict(LLAMA_LIKE, head_dim=8, sliding_window=8)),  # softcapping, sliding and full layers
    "gpt-neox": ("GPTNeoX", dict(intermediate_size=64)),  # rotary on a quarter of each head, parallel residual
    "opt": ("OPT", dict(ffn_dim=64, word_embed_proj_dim=32)),  # learned positions
    "phi3": ("Phi3", LLAMA_LIKE),  # fused qkv and gate-up projections
}


def tiny_causal_lm(arch: str, vocab: int, **ids):
    """A random 2-layer causal LM of `arch` (a key of ARCHITECTURES), hidden size 32, 64 positions,
    with the token ids given (bos_token_id, eos_token_id, pad_token_id)."""
    import torch

    name, settings = ARCHITECTURES[arch]
    torch.manual_seed(0)
    config = getattr(transformers, f"{name}Config")(
        vocab_size=vocab, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=64, **ids, **settings
    )
    return getattr(transformers, f"{name}ForCausalLM")(config).eval()
