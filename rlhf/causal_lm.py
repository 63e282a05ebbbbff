"""How the project calls a `transformers` causal LM's forward where that leans on its internals:
the keyword that takes a KV cache, logits for the last positions alone (`logits_to_keep`), and
the attention function (`fp32_attention_on_cpu`, through transformers' public AttentionInterface).

Both are found by what the model does, once per model class, never from its forward's signature:
transformers 5.24 renamed `past_key_values` to `cache` behind a decorator that still takes the
old name, and a forward that takes `**kwargs` accepts any name and may ignore it. The cache
keyword is the one after whose prefill the cache holds the prompt; `logits_to_keep` stays in use
where the logits come back that short. tests/test_sampling.py drives every architecture the
project supports through here, and fails on a release that breaks it.
"""

from __future__ import annotations

import torch
import transformers
from packaging.version import Version

# The name the installed transformers uses, tried first; the other one once, where it fills no cache.
CACHE_KEYWORDS = ("cache", "past_key_values") if Version(transformers.__version__) >= Version("5.24") else ("past_key_values", "cache")

_cache_keyword: dict[tuple[type, type], str | None] = {}  # None: the forward fills no cache under either name
_keeps_logits: dict[tuple[type, type], bool] = {}


def base_model(model):
    """The transformers model: the one under peft's adapters, or `model` itself."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def model_class(model) -> tuple[type, type]:
    """What the answers are remembered by: the model's class and, under adapters, the wrapped one's."""
    return type(model), type(base_model(model))


def cache_keyword(model) -> str | None:
    """The keyword under which `model`'s forward fills a cache, once `prefill` has found it."""
    return _cache_keyword.get(model_class(model))


def last_logits(model, inputs: dict, keep: int, **options):
    """`model(**inputs, **options)` with logits (B, keep, V) at the last `keep` positions alone: the
    language-model head runs on those where the model takes `logits_to_keep`, and the logits are
    cut to them otherwise."""
    key, length = model_class(model), inputs["input_ids"].shape[1]
    if not _keeps_logits.get(key, True):
        out = model(**inputs, **options)
    else:
        try:
            out = model(**inputs, **options, logits_to_keep=keep)
        except TypeError as exc:  # a forward that takes neither `logits_to_keep` nor **kwargs
            if key in _keeps_logits or "logits_to_keep" not in str(exc):
                raise
            out = model(**inputs, **options)
            _keeps_logits[key] = False
        if key not in _keeps_logits and length > keep:  # a forward that takes **kwargs may ignore it
            _keeps_logits[key] = out.logits.shape[1] == keep
    out.logits = out.logits[:, -keep:]
    return out


def prefill(model, inputs: dict) -> tuple[torch.Tensor, transformers.DynamicCache] | None:
    """(next-token logits (B, V), the cache holding `inputs`) after one forward pass over the prompt
    `inputs` (input_ids, attention_mask, position_ids), or None where the forward fills no cache."""
    key, length = model_class(model), inputs["input_ids"].shape[1]
    names = [_cache_keyword[key]] if key in _cache_keyword else CACHE_KEYWORDS
    for name in names:
        if name is None:
            break
        cache = transformers.DynamicCache(config=base_model(model).config)
        try:
            out = last_logits(model, inputs, 1, use_cache=True, **{name: cache})
        except TypeError as exc:  # a forward without **kwargs that does not take this name
            if name not in str(exc):  # any other TypeError is a real error, not a missing keyword
                raise
            continue
        # The cache is filled in place; a forward that ignored it (or built its own) left it empty.
        if cache.get_seq_length() == length:
            _cache_keyword[key] = name
            return out.logits[:, -1], cache
    _cache_keyword[key] = None
    return None


def extend(model, cache: transformers.DynamicCache, inputs: dict) -> torch.Tensor:
    """Next-token logits (B, V) after `inputs` (one token per row), appended to a cache from `prefill`."""
    out = model(**inputs, use_cache=True, **{_cache_keyword[model_class(model)]: cache})
    return out.logits[:, -1]


ATTENTION = "rlhf_sdpa"
"""transformers' sdpa attention, in fp32 on a CPU under autocast or with bf16 inputs."""


def _sdpa(module, query, key, value, attention_mask, **kwargs):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    # Under autocast sdpa casts fp32 inputs (rotary embeddings promote queries and keys) to bf16 itself.
    lowered = torch.is_autocast_enabled("cpu") or torch.bfloat16 in (query.dtype, key.dtype, value.dtype)
    if query.device.type != "cpu" or not lowered:
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    if attention_mask is not None and attention_mask.is_floating_point():
        attention_mask = attention_mask.float()
    with torch.autocast("cpu", enabled=False):
        out, weights = sdpa_attention_forward(module, query.float(), key.float(), value.float(), attention_mask, **kwargs)
    return out.to(value.dtype), weights


def fp32_attention_on_cpu(model) -> None:
    """Have `model`'s sdpa attention compute in fp32 on a CPU under bf16 autocast (or with bf16
    inputs): torch's CPU flash-attention kernels run 2 to 3 times slower in bf16 than in fp32,
    the backward most (docs/performance.md), while the products around them gain from bf16. The
    output comes back in the values' precision. Elsewhere (fp32, a GPU) it is sdpa unchanged. A
    model on another attention (eager, flash) keeps it; the saved config names none."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    if getattr(model.config, "_attn_implementation", None) != "sdpa":
        return
    AttentionInterface.register(ATTENTION, _sdpa)
    AttentionMaskInterface.register(ATTENTION, sdpa_mask)
    model.set_attn_implementation(ATTENTION)
