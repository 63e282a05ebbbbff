"""Sampling completions: left-padded prompt batches, temperature / top-p / top-k, stop at EOS.

`sample` returns response token ids (B, T) in which everything after a sequence's first EOS is
padding, and a (B,) flag telling which responses ended with EOS.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from rlhf.encoding import pad
from rlhf.models import position_ids
from rlhf.ops import logprobs_from_logits


@dataclass
class SamplingConfig:
    temperature: float = 0.7
    """Softmax temperature (checklist item 19: fixed for rollouts)."""
    top_p: float = 1.0
    """Nucleus sampling: keep the smallest set of tokens with this much probability (1: off)."""
    top_k: int = 0
    """Keep only the k most likely tokens (0: off)."""
    max_new_tokens: int = 64
    """Longest response; one that reaches it without EOS is truncated."""


def truncate_at_eos(responses: torch.Tensor, eos_id: int, pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Pad everything after the first EOS of each row (B, T); also return (B,) whether EOS occurred."""
    is_eos = responses == eos_id
    ended = is_eos.any(-1)
    after = (is_eos.long().cumsum(-1) - is_eos.long()) > 0  # strictly after the first EOS
    return responses.masked_fill(after, pad_id), ended


def response_mask(responses: torch.Tensor, eos_id: int) -> torch.Tensor:
    """(B, T) 1 on response tokens up to and including the first EOS, 0 after (checklist item 3)."""
    is_eos = (responses == eos_id).long()
    return ((is_eos.cumsum(-1) - is_eos) == 0).long()


@torch.no_grad()
def sample(model, prompts: list[list[int]], pad_id: int, eos_id: int, config: SamplingConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample one response per prompt with the model's KV cache; returns (responses, ended_with_eos)."""
    device = next(model.parameters()).device
    ids, mask = pad(prompts, pad_id, side="left")
    greedy = config.temperature == 0
    output = model.generate(
        input_ids=ids.to(device),
        attention_mask=mask.to(device),
        do_sample=not greedy,
        temperature=None if greedy else config.temperature,
        top_p=None if greedy else config.top_p,
        top_k=None if greedy else config.top_k,
        max_new_tokens=config.max_new_tokens,
        pad_token_id=pad_id,
        eos_token_id=eos_id,
    )
    responses = output[:, ids.shape[1] :]
    return truncate_at_eos(responses, eos_id, pad_id)


def sample_texts(model, tokenizer, prompts: list[str], config: SamplingConfig, batch_size: int = 32, desc: str = "sampling") -> list[str]:
    """One completion per prompt, decoded without special tokens."""
    texts: list[str] = []
    was_training = model.training
    model.eval()
    for i in tqdm(range(0, len(prompts), batch_size), desc=desc, leave=False, dynamic_ncols=True):
        batch = [tokenizer(p)["input_ids"] for p in prompts[i : i + batch_size]]
        responses, _ = sample(model, batch, tokenizer.pad_token_id, tokenizer.eos_token_id, config)
        texts.extend(tokenizer.batch_decode(responses, skip_special_tokens=True))
    model.train(was_training)
    return texts


@torch.no_grad()
def response_logprobs(
    model, query: torch.Tensor, query_mask: torch.Tensor, responses: torch.Tensor, mask: torch.Tensor, temperature: float, batch_size: int = 32
) -> torch.Tensor:
    """(B, T) log-probs of response tokens under a causal LM, prompts left-padded (B, P)."""
    out = []
    P = query.shape[1]
    for i in range(0, len(query), batch_size):
        rows = slice(i, i + batch_size)
        ids = torch.cat([query[rows], responses[rows]], 1)
        attention = torch.cat([query_mask[rows], mask[rows]], 1)
        logits = model(input_ids=ids, attention_mask=attention, position_ids=position_ids(attention)).logits
        out.append(logprobs_from_logits(logits[:, P - 1 : -1], responses[rows], temperature))
    return torch.cat(out)
