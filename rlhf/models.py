"""Loading and saving models: any Hugging Face causal LM by local path or hub id, full or LoRA.

The rules that every stage shares live here: a tokenizer always has a pad token distinct from
every stop token (checklist item 1), position ids follow left padding (item 2), a fresh reward head is
initialised N(0, 1/sqrt(d+1)) (item 7), a response ends at any of the model's stop tokens
(`stop_token_ids`: EOS, the chat template's end of turn, the generation config's EOS ids, which
loading and saving keep), and a saved model loads back with plain transformers.
`check_model_path` refuses a name that reads as a local path and does not exist, before
transformers would send it to the hub; every stage calls it before loading anything.
"""

from __future__ import annotations

import copy
import logging
import math
import os
import shutil
import weakref
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Iterator

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

from rlhf import causal_lm
from rlhf.config import ConfigError, PositiveInt, Range

log = logging.getLogger(__name__)

PAD_TOKEN = "<|pad|>"


@dataclass
class LoraConfig:
    enabled: bool = False
    """Train low-rank adapters (peft) instead of all weights."""
    r: PositiveInt = 16
    """Adapter rank."""
    alpha: PositiveInt = 32
    """Adapter scaling numerator (scale = alpha / r)."""
    dropout: Annotated[float, Range(ge=0, lt=1)] = 0.0
    """Dropout on the adapter input (kept 0 for RL: checklist item 6)."""
    target_modules: list[str] = field(default_factory=lambda: ["all-linear"])
    """Module names to adapt; ["all-linear"] adapts every linear layer but the output head."""


def is_local_path(name: str) -> bool:
    """Whether a model name means a local directory rather than a hub id (`gpt2`, `org/name`):
    it exists, starts as a path does (/, ./, ../, ~), has more than one '/', or its first
    component is a local directory (`runs/model`)."""
    return (
        os.path.exists(os.path.expanduser(name))
        or name.startswith(("/", "./", "../", "~"))
        or name.count("/") > 1
        or os.path.isdir(name.split("/")[0])
    )


def check_model_path(key: str, name: str) -> None:
    """Refuse a local model path that does not exist, before transformers would take it for a
    hub id and retry the hub for a minute."""
    if is_local_path(name) and not os.path.exists(os.path.expanduser(name)):
        raise ConfigError(f"{key}: {name} does not exist (read as a local path; a hub id looks like gpt2 or org/name)")


def check_generation_room(key: str, name: str, max_new_tokens: int) -> None:
    """Refuse a `max_new_tokens` that leaves no room for a prompt in the context of model `name`
    (read from its config alone; call `check_model_path` first)."""
    positions = context_length(AutoConfig.from_pretrained(name))
    if max_new_tokens >= positions:
        raise ConfigError(f"{key}: must be between 1 and {positions - 1} for a model of {positions} positions ({name}), got {max_new_tokens}")


def load_tokenizer(name: str, require_eos: bool = True):
    """The model's tokenizer, with a fresh pad token added when it has none or its pad is one of
    the model's stop tokens (its EOS, its template's end of turn, an EOS id of the model's
    generation config: Qwen2.5-Instruct pads with <|endoftext|>, which its generation config lists)."""
    tokenizer = AutoTokenizer.from_pretrained(name)
    if require_eos and tokenizer.eos_token_id is None:
        raise ConfigError(f"{name}: the tokenizer has no EOS token; set one before training")
    pad = tokenizer.pad_token_id
    if pad is None or pad == tokenizer.eos_token_id or pad in turn_end_ids(tokenizer) or pad in _listed_eos_ids(name):
        # A stop token as pad is masked out of the loss, and the policy never learns to stop there.
        tokenizer.add_special_tokens({"pad_token": PAD_TOKEN})
        log.info("%s: added pad token %s (id %d), distinct from every stop token", name, PAD_TOKEN, tokenizer.pad_token_id)
    return tokenizer


def _listed_eos_ids(name: str) -> list[int]:
    """The EOS ids of the generation config saved with model `name`; [] where it has none."""
    from transformers import GenerationConfig

    try:
        listed = GenerationConfig.from_pretrained(name).eos_token_id
    except OSError:  # no generation_config.json (a tokenizer alone, a classifier)
        return []
    return [listed] if isinstance(listed, int) else list(listed or [])


def _fit_vocab(model, tokenizer) -> None:
    """Room for the tokenizer's added tokens, its pad id, and its EOS among the model's: an EOS list
    in the config or generation config (Llama-3's [eos, eot]) is kept, the tokenizer's id added."""
    if model.get_input_embeddings().num_embeddings < len(tokenizer):
        model.resize_token_embeddings(len(tokenizer), mean_resizing=True)
    model.config.pad_token_id = tokenizer.pad_token_id
    if tokenizer.eos_token_id is not None:
        model.config.eos_token_id = _with_id(getattr(model.config, "eos_token_id", None), tokenizer.eos_token_id)
    if getattr(model, "generation_config", None) is not None and tokenizer.eos_token_id is not None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
        model.generation_config.eos_token_id = _with_id(model.generation_config.eos_token_id, tokenizer.eos_token_id)


def _with_id(ids: int | list[int] | None, new: int) -> int | list[int]:
    """`ids` (an int, a list or None) with `new` appended where it is missing, in their order."""
    present = [] if ids is None else [ids] if isinstance(ids, int) else list(ids)
    if new in present:
        return ids
    return new if not present else present + [new]


def stop_token_ids(tokenizer, model_or_generation_config=None) -> list[int]:
    """The token ids at which a response ends, sorted and unique: the union of

    - the `eos_token_id` of the model's generation config (an int or a list), what `generate`
      stops at for the checkpoint: Qwen2.5-Instruct lists `<|im_end|>` and `<|endoftext|>`,
      Llama-3.1-Instruct `<|end_of_text|>`, `<|eom_id|>` and `<|eot_id|>`. Pass the model (its
      `generation_config` is read; peft models pass it through) or a GenerationConfig; None: none.
    - the tokenizer's `eos_token_id`, the token that closes every SFT target (rlhf/encoding.py).
    - the special token(s) that close an assistant turn of the tokenizer's chat template, where it
      has one (`turn_end_ids`): a Qwen base model's tokenizer has eos `<|endoftext|>` and ends its
      turns with `<|im_end|>`.

    The pad token is never in the set: padding fills a response after its end and must not read
    as one (checklist item 1). A checkpoint that lists its pad token among its EOS ids stops at
    the others.
    """
    config = getattr(model_or_generation_config, "generation_config", model_or_generation_config)
    listed = getattr(config, "eos_token_id", None)
    ids = set([listed] if isinstance(listed, int) else listed or [])
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    ids |= set(turn_end_ids(tokenizer))
    ids.discard(tokenizer.pad_token_id)
    return sorted(ids)


_TURN_MARK = "Sure"  # the assistant's content in the probe conversation, a word no template rewrites
_turn_ends: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # tokenizer -> (its template, the ids)


def turn_end_ids(tokenizer) -> list[int]:
    """The special tokens (those decoding skips) that a tokenizer's chat template puts right after
    an assistant turn's content (`<|im_end|>`, `<|eot_id|>`, `<end_of_turn>`; whitespace before
    them is passed over), found by rendering a one-turn conversation; [] without a chat template.
    Found once per tokenizer and template: PPO asks at every step."""
    template = getattr(tokenizer, "chat_template", None)
    cached = _turn_ends.get(tokenizer)
    if cached is None or cached[0] != template:
        cached = _turn_ends[tokenizer] = (template, _probe_turn_end(tokenizer) if template else [])
    return cached[1]


def _probe_turn_end(tokenizer) -> list[int]:
    conversation = [{"role": "user", "content": "Hello"}, {"role": "assistant", "content": _TURN_MARK}]
    try:
        text = tokenizer.apply_chat_template(conversation, tokenize=False)
    except Exception as error:  # a template may refuse the probe (a required system turn, ...)
        log.warning("the chat template does not render a user and an assistant turn (%s); no end-of-turn token taken from it", error)
        return []
    if _TURN_MARK not in text:
        return []
    tail = text[text.rindex(_TURN_MARK) + len(_TURN_MARK) :].lstrip()
    special = set(tokenizer.all_special_ids) | {i for i, token in tokenizer.added_tokens_decoder.items() if token.special}
    ends = []
    for token in tokenizer(tail, add_special_tokens=False)["input_ids"]:
        if token not in special:
            break
        ends.append(token)
    return ends


def load_causal_lm(name: str, tokenizer, dtype: torch.dtype = torch.float32):
    model = AutoModelForCausalLM.from_pretrained(name, dtype=dtype)
    _fit_vocab(model, tokenizer)
    causal_lm.fp32_attention_on_cpu(model)
    return fused_activations(model)


def fused_activations(model):
    """`model` with each tanh-approximated GELU written out in elementwise operations (`gelu_new`
    of GPT-2 and Phi, `gelu_fast`) replaced by transformers' `GELUTanh`, torch's fused kernel of
    the same function: equal to float rounding (2.4e-7), and one pass over the activations
    instead of seven, forward and backward (docs/performance.md). The config is unchanged, so a
    saved checkpoint names the activation it was loaded with."""
    from transformers.activations import FastGELUActivation, GELUTanh, NewGELUActivation

    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) in (NewGELUActivation, FastGELUActivation):
                setattr(parent, name, GELUTanh())
    return model


def load_sequence_classifier(name: str, tokenizer=None, num_labels: int | None = None, dtype=torch.float32):
    """A sequence-classification model; with `num_labels=1` a reward model whose head is
    initialised N(0, 1/sqrt(d+1)) when `name` is a plain causal LM (no trained head yet)."""
    kwargs = {} if num_labels is None else {"num_labels": num_labels}
    model = AutoModelForSequenceClassification.from_pretrained(name, dtype=dtype, **kwargs)
    architectures = model.config.architectures or []
    trained_head = any("ForSequenceClassification" in a for a in architectures)
    if tokenizer is not None:
        _fit_vocab(model, tokenizer)
    if num_labels == 1 and not trained_head:
        head = score_head(model)
        d = head.in_features
        torch.nn.init.normal_(head.weight, std=1 / math.sqrt(d + 1))
        if head.bias is not None:
            torch.nn.init.zeros_(head.bias)
    causal_lm.fp32_attention_on_cpu(model)
    return fused_activations(model)


def load_value_model(name: str, tokenizer) -> torch.nn.Module:
    """A one-output sequence classifier to start a critic from; from a personal reward model
    (several outputs: the pooled score, then one per labeler) it keeps the pooled output."""
    model = load_sequence_classifier(name, tokenizer, num_labels=None if trained_outputs(name) > 1 else 1)
    head = score_head(model)
    if head.out_features > 1:
        pooled = torch.nn.Linear(head.in_features, 1, bias=head.bias is not None)
        with torch.no_grad():
            pooled.weight.copy_(head.weight[:1])
            if head.bias is not None:
                pooled.bias.copy_(head.bias[:1])
        setattr(model, "score" if getattr(model, "score", None) is head else "classifier", pooled)
        model.config.num_labels = 1
        for key in ("reward_labelers", "reward_prior_labels"):  # a critic, not a personal reward model
            if hasattr(model.config, key):
                delattr(model.config, key)
    return model


def trained_outputs(name: str) -> int:
    """The outputs of a trained sequence classifier's head; 0 for a causal LM (no trained head)."""
    config = AutoConfig.from_pretrained(name)
    trained = any("ForSequenceClassification" in a for a in config.architectures or [])
    return config.num_labels if trained else 0


def score_head(model) -> torch.nn.Module:
    """The head of a sequence-classification model (`score` or `classifier`): a Linear, or the
    wrapper peft puts around it when it trains the head beside LoRA adapters."""
    for name in ("score", "classifier"):
        head = getattr(model, name, None)
        if isinstance(head, torch.nn.Module):
            return head
    raise ValueError(f"{type(model).__name__}: no score head found (expected `score` or `classifier`)")


def add_lora(model, config: LoraConfig, task_type: str):
    """Wrap `model` with peft LoRA adapters; only adapter (and, for SEQ_CLS, head) weights train."""
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    from transformers.pytorch_utils import Conv1D

    targets = config.target_modules
    peft_config = PeftLoraConfig(
        r=config.r,
        lora_alpha=config.alpha,
        lora_dropout=config.dropout,
        target_modules="all-linear" if targets == ["all-linear"] else targets,
        task_type=task_type,
        # GPT-2's Conv1D layers store their weights transposed (peft would fix this and warn)
        fan_in_fan_out=any(isinstance(m, Conv1D) for m in model.modules()),
    )
    return get_peft_model(model, peft_config)


def context_length(config) -> int:
    """The longest sequence the model's position embeddings allow (a large number when unbounded)."""
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return 1 << 30


def position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """(B, T) positions that count only real tokens, so left padding does not shift them."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def dropout_off(model) -> None:
    """Set every dropout probability to 0 (checklist item 6): RL log-probs must be deterministic."""
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    for key in ("resid_pdrop", "embd_pdrop", "attn_pdrop", "attention_dropout", "hidden_dropout", "dropout"):
        if isinstance(getattr(model.config, key, None), float):
            setattr(model.config, key, 0.0)


@contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """Write a directory under a temporary name and move it into place only when complete.

    A crash leaves either the previous complete directory or the new one, never a half-written
    one under the final name (a stale temporary directory may be left beside it).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    old = path.with_name(f".{path.name}.old-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for f in tmp.rglob("*"):  # data on disk before the rename makes it visible
        if f.is_file():
            with f.open("rb") as handle:
                os.fsync(handle.fileno())
    if path.exists():
        path.rename(old)
    tmp.rename(path)
    shutil.rmtree(old, ignore_errors=True)


def save_model(model, tokenizer, path: str | Path, extra_config: dict | None = None) -> Path:
    """Save for plain transformers: LoRA adapters are merged (and also kept under `adapter/`)."""
    from peft import PeftModel

    with atomic_dir(path) as tmp:
        if isinstance(model, PeftModel):
            model.save_pretrained(tmp / "adapter")
            model = _merged_copy(model)
        for key, value in (extra_config or {}).items():
            setattr(model.config, key, value)
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return Path(path)


def _merged_copy(peft_model):
    """A merged copy of a peft model, leaving the trained adapters in place (training may go on)."""
    return copy.deepcopy(peft_model).merge_and_unload()


def response_slice(logits_or_values: torch.Tensor, prompt_len: int) -> torch.Tensor:
    """The positions whose outputs belong to response tokens: P-1 .. P+T-2 predict tokens P .. P+T-1."""
    return logits_or_values[:, prompt_len - 1 : -1]


def lm_output(model, kwargs: dict, response_length: int | None, **options):
    """The causal LM's output, with logits for the last T + 1 positions alone given the response
    length T, or for all positions (the language-model head over the prompt is wasted work: its
    output, (B, P, V), is the largest tensor of the pass when prompts are long)."""
    if response_length is None:
        return model(**kwargs, **options)
    return causal_lm.last_logits(model, kwargs, response_length + 1, **options)


def lm_logits(model, input_ids, attention_mask, position_ids, response_length: int) -> torch.Tensor:
    """(B, T, V) logits at the T positions that predict the response tokens."""
    kwargs = dict(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids)
    return lm_output(model, kwargs, response_length).logits[:, :-1]


class PolicyAndValue(torch.nn.Module):
    """The trained policy and its critic as one module (one optimiser, one data-parallel wrapper).

    The critic is a separate network's per-token head (PPO's default, checklist item 8), a linear
    head on the policy's last hidden state (`value_head`), or absent (the critic-free algorithms):
    then the values are None.
    """

    def __init__(self, policy, value_model=None, value_head: torch.nn.Linear | None = None):
        super().__init__()
        self.policy, self.value_model, self.value_head = policy, value_model, value_head

    @property
    def has_critic(self) -> bool:
        return self.value_model is not None or self.value_head is not None

    def forward(self, input_ids, attention_mask, position_ids, response_length: int | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(logits (B, L, V), values (B, L) or None); given `response_length` T, the outputs at the
        T positions that predict response tokens alone, (B, T, V) and (B, T) (see `lm_logits`)."""
        kwargs = dict(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids)
        if self.value_head is not None:
            out = lm_output(self.policy, kwargs, response_length, output_hidden_states=True)
            values = self.value_head(out.hidden_states[-1]).squeeze(-1)
            logits = out.logits
        else:
            logits = lm_output(self.policy, kwargs, response_length).logits
            values = self.values(**kwargs) if self.value_model is not None else None
        if response_length is None:
            return logits, values
        return logits[:, :-1], None if values is None else response_slice(values, input_ids.shape[1] - response_length)

    def values(self, input_ids, attention_mask, position_ids) -> torch.Tensor:
        """(B, L) values from the separate value network alone (without a value head on the policy)."""
        model = self.value_model.get_base_model() if hasattr(self.value_model, "get_base_model") else self.value_model
        hidden = getattr(model, model.base_model_prefix)(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids).last_hidden_state
        return score_head(model)(hidden).squeeze(-1)
