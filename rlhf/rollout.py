"""What flows between the phases of an RL step, and the phases that make it: sample, score, and
the forward passes for old log-probs, values and reference log-probs.

The samples come from a rollout engine (`RolloutEngine`): `sample(prompts)` returns responses
with the engine's log-probs of them, and `sync(policy)` runs after each update. `LocalEngine` is
the project's sampler on the trained weights themselves; an engine in another process or
precision (`rlhf.vllm_engine.VLLMEngine` on a GPU) stands in its place without touching the
trainer. Where the engine's log-probs are not the trainer's own (`RolloutEngine.trainer_logprobs`
False: another engine, another precision), the trainer computes its own for the ratio (checklist
item 18), measures how far the two are apart, and may weight each token by truncated importance
sampling (`importance_weights`). Every function here takes the config pieces it uses, never a
stage's config.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from typing import Protocol

import torch

from rlhf import ops, training
from rlhf.data import Content
from rlhf.encoding import pad
from rlhf.models import PolicyAndValue, lm_logits, position_ids, response_slice
from rlhf.sampling import Samples, SamplingConfig, response_mask, sample_with_logprobs


@dataclass
class Rollout:
    """One batch of experience; T is the response length, P the (left-padded) prompt length.
    Rows are prompt-major: the K responses to one prompt are consecutive rows."""

    query: torch.Tensor  # (B, P) prompt ids, left-padded
    query_mask: torch.Tensor  # (B, P) 1 on prompt tokens
    responses: torch.Tensor  # (B, T) sampled ids, pad after the first stop token (EOS, end of turn)
    mask: torch.Tensor  # (B, T) 1 on response tokens up to and including the first stop token
    ended: torch.Tensor  # (B,) True where the response emitted a stop token
    logprobs: torch.Tensor = None  # (B, T) log-probs of the sampled tokens under the trainer's policy before the update
    ref_logprobs: torch.Tensor = None  # (B, T) the same under the reference
    values: torch.Tensor = None  # (B, T) V(s_t), the state before response token t; None without a critic
    scores: torch.Tensor = None  # (B,) reward-source score after the missing-EOS penalty and clipping
    raw_scores: torch.Tensor = None  # (B,) reward-source score as returned
    kl: torch.Tensor = None  # (B, T) per-token KL estimate to the reference
    rewards: torch.Tensor = None  # (B, T) per-token rewards the advantages are estimated from
    advantages: torch.Tensor = None  # (B, T) advantages (per token, or a sequence's repeated on its tokens)
    returns: torch.Tensor = None  # (B, T) value targets; None without a critic
    engine_logprobs: torch.Tensor = None  # (B, T) the engine's log-probs of the sampled tokens, where they are not the trainer's own
    is_weights: torch.Tensor = None  # (B, T) truncated importance weights trainer / engine, where the loss uses them

    def inputs(self, rows=slice(None)) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(input_ids, attention_mask, position_ids) of prompt + response for the given rows."""
        ids = torch.cat([self.query[rows], self.responses[rows]], 1)
        attention = torch.cat([self.query_mask[rows], self.mask[rows]], 1)
        return ids, attention, position_ids(attention)

    def importance(self, rows) -> torch.Tensor | None:
        """The truncated importance weights of the given rows, None where the loss takes none."""
        return None if self.is_weights is None else self.is_weights[rows]


class RolloutEngine(Protocol):
    trainer_logprobs: bool
    """True where `Samples.logprobs` are what the trainer's own forward pass computes (the same
    weights, precision and kernels): the trainer then takes them instead of a pass of its own."""

    def sample(self, prompts: list[list[int]], generator: torch.Generator | None = None) -> Samples:
        """One response per prompt id list, with the engine's log-probs of the sampled tokens at
        the sampling temperature (None where the engine gives none)."""

    def sync(self, policy) -> None:
        """Take the policy's new weights after an update."""


class LocalEngine:
    """The project's sampler (rlhf.sampling) on the trained policy itself: `sync` has nothing to do.

    It runs in the precision of the training passes. In fp32 its log-probs match a forward pass
    of the policy to about 1e-5 (tests/test_sampling.py) and save one. Under bf16 it decodes under
    the same autocast: products in bf16 (autocast casts a trained weight once per rollout), layer
    norms, residuals and, on a CPU, attention in fp32. Decoding reads every weight once per token,
    and bf16 weights are half the bytes (docs/performance.md). Its log-probs then come from other
    shapes of the same products than the training pass's, so the trainer computes its own
    (checklist item 18) and measures the mismatch against these.
    """

    def __init__(self, policy, pad_id: int, stop_ids: list[int], sampling: SamplingConfig, bf16: bool):
        self.policy, self.pad_id, self.stop_ids, self.sampling, self.bf16 = policy, pad_id, stop_ids, sampling, bf16
        self.trainer_logprobs = not bf16

    def sample(self, prompts: list[list[int]], generator: torch.Generator | None = None) -> Samples:
        with training.autocast(next(self.policy.parameters()).device, self.bf16):
            return sample_with_logprobs(self.policy, prompts, self.pad_id, self.stop_ids, self.sampling, generator)

    def sync(self, policy) -> None:
        pass


@contextlib.contextmanager
def timed(timings: dict[str, float], key: str):
    """Add the wall time of the block to `timings[key]` (checklist item 20: time per phase)."""
    started = time.perf_counter()
    yield
    timings[key] = timings.get(key, 0.0) + time.perf_counter() - started


def chunks(n: int, size: int) -> list[slice]:
    return [slice(i, min(i + size, n)) for i in range(0, n, size)]


@torch.no_grad()
def generate(engine: RolloutEngine, prompts: list[list[int]], pad_id: int, stop_ids: list[int], device, generator=None) -> Rollout:
    """A Rollout holding the left-padded prompts, the engine's responses with their masks (a
    response ends at its first stop token: EOS, end of turn, generation_config) and its log-probs:
    as `logprobs` where they are the trainer's own, else as `engine_logprobs`."""
    samples = engine.sample(prompts, generator)
    query, query_mask = pad(prompts, pad_id, side="left")
    responses = samples.responses.to(device)
    mask = response_mask(responses, stop_ids)
    batch = Rollout(query.to(device), query_mask.to(device), responses, mask, samples.ended.to(device))
    if samples.logprobs is not None:
        logprobs = samples.logprobs.to(device).float() * mask
        if engine.trainer_logprobs:
            batch.logprobs = logprobs
        else:
            batch.engine_logprobs = logprobs
    return batch


def importance_weights(batch: Rollout, cap: float) -> dict[str, float]:
    """Compare the trainer's log-probs of the sampled tokens with the engine's, where they differ.

    Returns the mismatch metrics: `rollout/mismatch_kl`, the mean per token of the k3 estimate of
    KL(engine || trainer) (the tokens were drawn by the engine), and `rollout/mismatch_max`, the
    largest |log-prob difference| of a token. With `cap` > 0 it sets `batch.is_weights`, the
    truncated importance weights min(pi_trainer / pi_engine, cap) of each token (TIS: the
    policy-gradient loss of a token is weighted by it, correcting for the engine having sampled),
    and logs their mean and the share of tokens truncated. No-op (no metrics) where the engine's
    log-probs are the trainer's own."""
    if batch.engine_logprobs is None:
        return {}
    mask = batch.mask.float()
    tokens = mask.sum().clamp(min=1)
    log_ratio = (batch.logprobs - batch.engine_logprobs) * mask  # log pi_trainer - log pi_engine
    metrics = {
        "rollout/mismatch_kl": (ops.kl_penalty(batch.engine_logprobs, batch.logprobs, "k3") * mask).sum().item() / tokens.item(),
        "rollout/mismatch_max": log_ratio.abs().max().item(),
    }
    if cap:
        ratio = log_ratio.exp()
        batch.is_weights = ratio.clamp(max=cap) * mask
        metrics["rollout/is_weight_mean"] = (batch.is_weights.sum() / tokens).item()
        metrics["rollout/is_truncated_fraction"] = (((ratio > cap).float() * mask).sum() / tokens).item()
    return metrics


@torch.no_grad()
def score(batch: Rollout, texts: list[Content], reward_source, tokenizer, missing_eos_penalty: float, score_clip: float) -> list[str]:
    """Score the decoded completions (each up to its first stop token, special tokens skipped) into
    `batch.raw_scores` and `batch.scores` (after the missing-EOS penalty, 0 for none, and clipping
    to +-score_clip, 0 for none); returns the completions. A reward model with the policy's
    tokenizer and template reads the sampled ids themselves (`SequenceClassifierScore.score_ids`)."""
    pad_id = tokenizer.pad_token_id
    completions = tokenizer.batch_decode(batch.responses * batch.mask + pad_id * (1 - batch.mask), skip_special_tokens=True)
    if getattr(reward_source, "reads_ids_of", None) is not None and reward_source.reads_ids_of(tokenizer):
        raw = reward_source.score_ids(texts, batch.query.cpu(), batch.query_mask.cpu(), batch.responses.cpu(), batch.mask.cpu(), completions)
    else:
        raw = reward_source(texts, completions)
    batch.raw_scores = raw.to(batch.responses.device)
    scores = batch.raw_scores.clone()
    if missing_eos_penalty:
        scores = torch.where(batch.ended, scores, torch.full_like(scores, missing_eos_penalty))
    if score_clip:
        scores = scores.clamp(-score_clip, score_clip)
    batch.scores = scores
    return completions


@torch.no_grad()
def policy_forward(model: PolicyAndValue, batch: Rollout, temperature: float, micro_batch_size: int, device, bf16: bool) -> None:
    """`batch.values` where there is a critic, and `batch.logprobs` where the engine gave none: a
    separate value network then runs alone, and the policy's pass runs only where it is needed."""
    P, T = batch.query.shape[1], batch.responses.shape[1]
    need_logprobs = batch.logprobs is None
    if not need_logprobs and not model.has_critic:
        return
    values_only = not need_logprobs and model.value_head is None
    logprobs, values = [], []
    for rows in chunks(len(batch.responses), micro_batch_size):
        with training.autocast(device, bf16):
            if values_only:
                value = response_slice(model.values(*batch.inputs(rows)), P)
            else:
                logits, value = model(*batch.inputs(rows), response_length=T)
                if need_logprobs:
                    logprobs.append(ops.logprobs_from_logits(logits, batch.responses[rows], temperature))
        if value is not None:
            values.append(value.float())
    if values:
        batch.values = torch.cat(values)
    if logprobs:
        batch.logprobs = torch.cat(logprobs)


@torch.no_grad()
def reference_forward(policy, reference, batch: Rollout, temperature: float, micro_batch_size: int, device, bf16: bool) -> None:
    """`batch.ref_logprobs`; with LoRA and no separate reference (`reference` None) the reference is
    the policy with its adapters off (checklist item 9)."""
    ref_logprobs = []
    for rows in chunks(len(batch.responses), micro_batch_size):
        with training.autocast(device, bf16), (policy.disable_adapter() if reference is None else contextlib.nullcontext()):
            logits = lm_logits(policy if reference is None else reference, *batch.inputs(rows), batch.responses.shape[1])
        ref_logprobs.append(ops.logprobs_from_logits(logits, batch.responses[rows], temperature))
    batch.ref_logprobs = torch.cat(ref_logprobs)
