"""Text to token ids for every stage, with the length checks that name file, line and field.

Prompts and completions are tokenized apart (the prompt with the tokenizer's special tokens, the
completion without) and joined, which is exactly what sampling produces: prompt tokens, then
generated tokens. Every target completion ends with EOS (checklist item 1).
"""

from __future__ import annotations

import torch

from rlhf.data import DataError, Demonstration, keep_valid

IGNORE = -100

# Used for {"messages": [...]} records when the tokenizer has no chat template of its own.
# It renders "User: ...\nAssistant: ...<eos>" turns, the same text as prompt/completion records.
FALLBACK_CHAT_TEMPLATE = (
    "{% for m in messages %}{% if not loop.first %}{{ '\\n' }}{% endif %}"
    "{{ m['role'] | capitalize }}: {{ m['content'] }}"
    "{% if m['role'] == 'assistant' %}{{ eos_token }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '\\nAssistant:' }}{% endif %}"
)


def encode_prompt(tokenizer, prompt: str, max_length: int, where: str, field: str = "prompt") -> list[int]:
    """Prompt ids; a prompt that leaves no room for a single completion token is an error."""
    ids = tokenizer(prompt)["input_ids"]
    if len(ids) >= max_length:
        raise DataError(where, f"{len(ids)} tokens; the model allows at most {max_length}", field)
    return ids


def encode_prompts(tokenizer, records: list, max_length: int, skip_invalid: bool) -> tuple[list, list[list[int]]]:
    """(the prompt records that fit, their ids): a prompt too long for the model stops the run,
    or with `skip_invalid` is left out and counted."""
    encoded = keep_valid(records, lambda r: (r, encode_prompt(tokenizer, r.prompt, max_length, r.source)), skip_invalid, "prompts too long for the model")
    return [r for r, _ in encoded], [ids for _, ids in encoded]


def encode_completion(
    tokenizer, prompt_ids: list[int], completion: str, max_length: int, where: str, field: str = "completion"
) -> list[int]:
    """Completion ids followed by EOS; prompt + completion must fit in `max_length`."""
    ids = tokenizer(completion, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    if len(prompt_ids) + len(ids) > max_length:
        total = len(prompt_ids) + len(ids)
        raise DataError(where, f"prompt + completion is {total} tokens; the model allows at most {max_length}", field)
    return ids


def encode_demonstration(tokenizer, demo: Demonstration, max_length: int) -> tuple[list[int], list[int]]:
    """(input_ids, labels) for SFT: labels are IGNORE on prompt tokens and EOS closes the target."""
    if demo.messages is not None:
        return _encode_conversation(tokenizer, demo, max_length)
    prompt = encode_prompt(tokenizer, demo.prompt, max_length, demo.source)
    completion = encode_completion(tokenizer, prompt, demo.completion, max_length, demo.source)
    return prompt + completion, [IGNORE] * len(prompt) + completion


def _encode_conversation(tokenizer, demo: Demonstration, max_length: int) -> tuple[list[int], list[int]]:
    """Train on every assistant turn: its tokens are those the turn adds to the rendered text."""

    def ids(messages, generation_prompt=False):
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    messages = demo.messages
    input_ids = ids(messages)
    labels = [IGNORE] * len(input_ids)
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        start, through = len(ids(messages[:i], generation_prompt=True)), ids(messages[: i + 1])
        if input_ids[: len(through)] != through:
            raise DataError(demo.source, "the chat template does not render turns as prefixes of the conversation", f"messages[{i}]")
        labels[start : len(through)] = input_ids[start : len(through)]
    if input_ids[-1] != tokenizer.eos_token_id:
        input_ids, labels = input_ids + [tokenizer.eos_token_id], labels + [tokenizer.eos_token_id]
    if len(input_ids) > max_length:
        raise DataError(demo.source, f"{len(input_ids)} tokens; the model allows at most {max_length}", "messages")
    return input_ids, labels


def pad(sequences: list[list[int]], pad_id: int, side: str = "right") -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, attention_mask), both (B, T): sequences padded on the right or on the left."""
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, seq in enumerate(sequences):
        span = slice(0, len(seq)) if side == "right" else slice(width - len(seq), width)
        ids[row, span] = torch.tensor(seq, dtype=torch.long)
        mask[row, span] = 1
    return ids, mask
