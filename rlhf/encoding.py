"""Text to token ids for every stage, with the length checks that name file, line and field.

One renderer serves SFT, the reward model (training and scoring), PPO and eval rollouts and
`rlhf generate`, so that the policy is rolled out on exactly the tokens it was fine-tuned on and
the reward model scores exactly the sequences it was trained on. As TRL does:

- a string prompt (standard format) is used as written, tokenized with the tokenizer's special
  tokens; its completion is tokenized on its own and followed by EOS (checklist item 1);
- a conversational prompt (a list of messages) is rendered with the chat template and its
  generation prompt (`<|im_start|>assistant\\n`); its completion's tokens are those the rendered
  conversation adds to the rendered prompt, which must be a prefix of it. They are cut after the
  turn's stop token, EOS or the special token the template closes turns with (`<|im_end|>`), so
  that the newline some templates put after it is not trained on; EOS is appended only when the
  template closed the turn with neither. An instruct tokenizer whose EOS is `<|im_end|>` thus
  trains one turn end, not `<|im_end|>\\n<|im_end|>`.

The chat template is the tokenizer's own, or FALLBACK_CHAT_TEMPLATE when it has none; a stage's
`chat_template` setting (`use_chat_template`) can replace it.
"""

from __future__ import annotations

from pathlib import Path

import jinja2
import torch

from rlhf.config import ConfigError
from rlhf.data import Content, DataError, Demonstration, keep_valid
from rlhf.models import turn_end_ids

IGNORE = -100

# Used for conversations when the tokenizer has no chat template of its own (or with
# `chat_template: none`). It renders "User: ...\nAssistant: ...<eos>" turns, the same text as
# the demo's prompt/completion records.
FALLBACK_CHAT_TEMPLATE = (
    "{% for m in messages %}{% if not loop.first %}{{ '\\n' }}{% endif %}"
    "{{ m['role'] | capitalize }}: {{ m['content'] }}"
    "{% if m['role'] == 'assistant' %}{{ eos_token }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '\\nAssistant:' }}{% endif %}"
)


def check_chat_template(setting: str, key: str) -> None:
    """Refuse a `chat_template` setting that is neither auto, none nor an existing file."""
    if setting not in ("auto", "none") and not Path(setting).is_file():
        raise ConfigError(f"{key}: {setting} is not a file (auto, none, or the path of a Jinja chat template)")


def use_chat_template(tokenizer, setting: str) -> None:
    """Apply a stage's `chat_template` setting to its tokenizer: auto keeps the tokenizer's own
    template, none puts FALLBACK_CHAT_TEMPLATE in its place, a path the template in that file.
    The tokenizer saved with the stage's model keeps it, so the next stage renders alike."""
    if setting == "none":
        tokenizer.chat_template = FALLBACK_CHAT_TEMPLATE
    elif setting != "auto":
        tokenizer.chat_template = Path(setting).read_text(encoding="utf-8")


def _template_ids(tokenizer, messages: list[dict], generation_prompt: bool, where: str = "", field: str = "messages") -> list[int]:
    # Rendered to text and tokenized without special tokens: the template writes them (BOS too).
    template = tokenizer.chat_template or FALLBACK_CHAT_TEMPLATE
    try:
        text = tokenizer.apply_chat_template(messages, chat_template=template, tokenize=False, add_generation_prompt=generation_prompt)
    except jinja2.TemplateError as error:  # raise_exception in the template: "System role not supported", ...
        raise DataError(where or "a conversation", f"the chat template refuses it: {error}", field) from None
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if template == FALLBACK_CHAT_TEMPLATE and tokenizer.bos_token_id is not None and tokenizer("a")["input_ids"][:1] == [tokenizer.bos_token_id]:
        # A model's own template writes its BOS; the plain one cannot know it. The tokenizer puts
        # it before a string prompt (Llama, Mistral), so it goes before a conversation too.
        ids = [tokenizer.bos_token_id] + ids
    return ids


def turn_stops(tokenizer) -> set[int]:
    """EOS and the special tokens the chat template closes an assistant turn with (`<|im_end|>`):
    where a turn's trained tokens end."""
    return {tokenizer.eos_token_id, *turn_end_ids(tokenizer)} - {None}


def _turn_end(tokenizer, ids: list[int]) -> int | None:
    """How many of a turn's `ids` to keep: through its last stop token (`turn_stops`), leaving out
    whitespace after it; None when the turn has no stop token."""
    stops = turn_stops(tokenizer)
    end = len(ids)
    while end and ids[end - 1] not in stops and not tokenizer.decode(ids[end - 1 : end]).strip():
        end -= 1
    return end if end and ids[end - 1] in stops else None


def render_prompt(tokenizer, prompt: Content, where: str = "", field: str = "prompt") -> list[int]:
    """The tokens a model is given before it answers `prompt` (see the module docstring)."""
    if isinstance(prompt, str):
        return tokenizer(prompt)["input_ids"]
    return _template_ids(tokenizer, prompt, True, where, field)


def render_completion(tokenizer, prompt: Content, prompt_ids: list[int], completion: Content, where: str, field: str = "completion") -> list[int]:
    """The tokens of `completion` after `prompt` (whose rendering is `prompt_ids`), ending with
    one stop token (see the module docstring)."""
    if isinstance(prompt, str):
        if not isinstance(completion, str):
            raise DataError(where, "a list of messages needs a conversational prompt (a list of messages too)", field)
        return tokenizer(completion, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    turns = [{"role": "assistant", "content": completion}] if isinstance(completion, str) else completion
    ids = _template_ids(tokenizer, prompt + turns, False, where, field)
    if ids[: len(prompt_ids)] != prompt_ids:
        raise DataError(where, "the chat template does not render the prompt and its generation prompt as a prefix of the conversation", field)
    ids = ids[len(prompt_ids) :]
    end = _turn_end(tokenizer, ids)
    return ids[:end] if end is not None else ids + [tokenizer.eos_token_id]


def render_sequence(tokenizer, prompt: Content, completion: Content, where: str = "", field: str = "completion") -> list[int]:
    """Prompt and completion tokens together: what a reward model reads, in training and scoring."""
    prompt_ids = render_prompt(tokenizer, prompt, where)
    return prompt_ids + render_completion(tokenizer, prompt, prompt_ids, completion, where, field)


def encode_prompt(tokenizer, prompt: Content, max_length: int, where: str, field: str = "prompt") -> list[int]:
    """Prompt ids; a prompt that leaves no room for a single completion token is an error."""
    ids = render_prompt(tokenizer, prompt, where, field)
    if len(ids) >= max_length:
        raise DataError(where, f"{len(ids)} tokens; the model allows at most {max_length}", field)
    return ids


def encode_prompts(tokenizer, records: list, max_length: int, skip_invalid: bool) -> tuple[list, list[list[int]]]:
    """(the prompt records that fit, their ids): a prompt too long for the model stops the run,
    or with `skip_invalid` is left out and counted."""
    encoded = keep_valid(records, lambda r: (r, encode_prompt(tokenizer, r.prompt, max_length, r.source)), skip_invalid, "prompts too long for the model")
    return [r for r, _ in encoded], [ids for _, ids in encoded]


def encode_completion(
    tokenizer, prompt_ids: list[int], completion: Content, max_length: int, where: str, field: str = "completion", prompt: Content = ""
) -> list[int]:
    """Completion ids ending with one stop token; prompt + completion must fit in `max_length`.
    `prompt` is what `prompt_ids` were rendered from (a conversation's completion is its next turn)."""
    ids = render_completion(tokenizer, prompt, prompt_ids, completion, where, field)
    if len(prompt_ids) + len(ids) > max_length:
        total = len(prompt_ids) + len(ids)
        raise DataError(where, f"prompt + completion is {total} tokens; the model allows at most {max_length}", field)
    return ids


def encode_demonstration(tokenizer, demo: Demonstration, max_length: int) -> tuple[list[int], list[int]]:
    """(input_ids, labels) for SFT: labels are IGNORE on prompt tokens and a stop token closes the target."""
    if demo.messages is not None:
        return _encode_conversation(tokenizer, demo, max_length)
    prompt = encode_prompt(tokenizer, demo.prompt, max_length, demo.source)
    completion = encode_completion(tokenizer, prompt, demo.completion, max_length, demo.source, prompt=demo.prompt)
    return prompt + completion, [IGNORE] * len(prompt) + completion


def _encode_conversation(tokenizer, demo: Demonstration, max_length: int) -> tuple[list[int], list[int]]:
    """Train on every assistant turn: the tokens of the rendered conversation from the turn's
    generation prompt through its first stop token (`turn_stops`). The conversation is rendered
    once: a template may render a turn differently once others follow it (Qwen3 drops the empty
    thinking block of earlier turns), so only what comes before each turn must be a prefix. The
    sequence ends at the last turn's stop token (what a template writes after it, such as
    Phi-3's EOS after `<|end|>`, is not trained on); EOS is appended where the last turn has none."""
    messages, stops = demo.messages, turn_stops(tokenizer)
    input_ids = _template_ids(tokenizer, messages, False, demo.source)
    labels = [IGNORE] * len(input_ids)
    assistant_turns = [i for i, message in enumerate(messages) if message["role"] == "assistant"]
    for i in assistant_turns:
        head = _template_ids(tokenizer, messages[:i], True, demo.source, f"messages[{i}]")
        if input_ids[: len(head)] != head:
            raise DataError(demo.source, "the chat template does not render the conversation before this turn, with its generation prompt, as a prefix of the whole", f"messages[{i}]")
        end = next((j + 1 for j in range(len(head), len(input_ids)) if input_ids[j] in stops), None)
        if end is None and i != assistant_turns[-1]:
            raise DataError(demo.source, "the chat template closes this assistant turn with neither EOS nor an end-of-turn token", f"messages[{i}]")
        labels[len(head) : end] = input_ids[len(head) : end]
    if end is None:  # the last turn, unclosed: the rest of the text is its, then EOS
        input_ids, labels = input_ids + [tokenizer.eos_token_id], labels + [tokenizer.eos_token_id]
    else:  # the last message is the assistant's
        input_ids, labels = input_ids[:end], labels[:end]
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
