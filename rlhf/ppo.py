"""PPO against a reward source, from the SFT policy, with a frozen reference (Ziegler et al. 2019).

    rlhf ppo --config recipes/demo.yaml ppo.kl.beta=0.05

One step: sample responses to a batch of prompts, score them, shape per-token rewards with the
KL penalty, estimate advantages with GAE, run K epochs of clipped-PPO minibatch updates, adapt
beta, log. Each step also logs how diverse its responses are and, against a reward model that
stored its held-out score band, whether the mean score is above it; the first step to show a sign
of collapse or over-optimisation says so in words (`rlhf.diagnostics`). The run stops at
`stop.max_steps`, at a mean-score threshold, when the KL to the reference passes its budget, or
when the responses collapse to a few, and says which. Writes `output_dir/model` (the policy,
loads with plain `AutoModelForCausalLM`), `output_dir/value`, checkpoints, `metrics.jsonl`,
TensorBoard events and `samples.jsonl` (a few completions per step).
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
import yaml
from accelerate.utils import gather_object
from tqdm.auto import tqdm

from rlhf import causal_lm, diagnostics, ops, training
from rlhf.config import ConfigError, NonNegative, NonNegativeInt, Positive, PositiveInt, UnitInterval, check_ranges, to_dict
from rlhf.data import Content, load_prompts
from rlhf.encoding import check_chat_template, encode_prompts, pad, use_chat_template
from rlhf.models import (
    LoraConfig,
    check_generation_room,
    check_model_path,
    context_length,
    dropout_off,
    load_causal_lm,
    load_sequence_classifier,
    load_tokenizer,
    position_ids,
    save_model,
    score_head,
    stop_token_ids,
)
from rlhf.sampling import SamplingConfig, response_mask, sample_with_logprobs
from rlhf.scoring import RewardSourceConfig, check_reward_path, check_reward_source, load_reward_source
from rlhf.tracking import Tracker, keep_steps_until
from rlhf.training import Precision

log = logging.getLogger(__name__)


@dataclass
class PromptData:
    train: list[str] = field(default_factory=list)
    """Prompt files or hub datasets ({prompt}: a string or a list of messages)."""
    skip_invalid: bool = False
    """Skip malformed records and records too long for the model (and report how many) instead of stopping at the first."""


@dataclass
class ValueConfig:
    model: str = ""
    """Model to initialise the value network from; empty: the reward model (kind model), else the policy."""
    head_on_policy: bool = False
    """Put the value head on the policy trunk instead of a separate network (less memory)."""


@dataclass
class KLConfig:
    beta: NonNegative = 0.05
    """KL coefficient (the starting value when adaptive)."""
    adaptive: bool = False
    """Adapt beta towards `target` (Ziegler et al.'s controller) instead of keeping it fixed."""
    target: Positive = 6.0
    """Adaptive controller: the KL per sequence to aim for."""
    horizon: PositiveInt = 10000
    """Adaptive controller: horizon in samples; larger moves beta more slowly."""
    estimator: Literal["k1", "k3"] = "k1"
    """Per-token KL estimator: k1 = log pi - log pi_ref, k3 = (r - 1) - log r."""


@dataclass
class PPOAlgoConfig:
    batch_size: PositiveInt = 64
    """Prompts per rollout (one PPO step), over all processes."""
    minibatch_size: PositiveInt = 16
    """Rollouts per optimiser update."""
    micro_batch_size: PositiveInt = 16
    """Rollouts per forward pass on one process; gradients accumulate up to `minibatch_size`."""
    epochs: PositiveInt = 4
    """Passes over each rollout batch."""
    gamma: UnitInterval = 1.0
    """Discount in GAE."""
    lam: UnitInterval = 0.95
    """GAE lambda."""
    clip: Positive = 0.2
    """Policy ratio clipping epsilon."""
    value_clip: Positive = 0.2
    """Value clipping range around the rollout values."""
    vf_coef: NonNegative = 0.1
    """Weight of the value loss in the combined objective."""
    entropy_coef: NonNegative = 0.0
    """Weight of the entropy bonus in the combined objective."""
    whiten_rewards: bool = False
    """Scale per-token rewards to unit variance per batch (their mean is kept)."""
    missing_eos_penalty: float = -1.0
    """Score given to a response that never emits a stop token, EOS or end of turn (0 turns the penalty off)."""
    score_clip: NonNegative = 0.0
    """Clip scores to [-score_clip, score_clip] (0: no clipping)."""


@dataclass
class PPOOptimConfig:
    lr: Positive = 1e-5
    """Peak learning rate (AdamW) for policy and value."""
    weight_decay: NonNegative = 0.0
    """AdamW weight decay."""
    warmup_steps: NonNegativeInt = 0
    """Linear warm-up in optimiser updates."""
    schedule: Literal["constant", "linear", "cosine"] = "linear"
    """Learning-rate schedule over the optimiser updates of max_steps rollouts."""
    grad_clip: NonNegative = 1.0
    """Global gradient-norm clipping (0 turns it off)."""


@dataclass
class StopConfig:
    max_steps: PositiveInt = 100
    """Stop after this many PPO steps."""
    reward_threshold: float | None = None
    """Stop when the mean score over the last `window` steps reaches this."""
    window: PositiveInt = 5
    """Steps averaged for the reward threshold."""
    kl_budget: Positive | None = None
    """Stop when a step's mean KL per sequence to the reference exceeds this (reward-hacking guard)."""
    min_distinct: NonNegative | None = None
    """Stop when a step's distinct responses per 100 prompts fall below this (collapse guard)."""


@dataclass
class PPOConfig:
    policy: str = ""
    """Policy to start from (the SFT model): a local path or a hub id."""
    reference: str = ""
    """The frozen reference of the KL penalty; empty: the policy it starts from (`rlhf loop` keeps the SFT model here while later rounds start from the last policy)."""
    output_dir: str = "runs/ppo"
    """Where the policy, value model, checkpoints, metrics and samples go."""
    prompts: PromptData = field(default_factory=PromptData)
    reward: RewardSourceConfig = field(default_factory=RewardSourceConfig)
    value: ValueConfig = field(default_factory=ValueConfig)
    generation: SamplingConfig = field(default_factory=SamplingConfig)
    kl: KLConfig = field(default_factory=KLConfig)
    algo: PPOAlgoConfig = field(default_factory=PPOAlgoConfig)
    optim: PPOOptimConfig = field(default_factory=PPOOptimConfig)
    stop: StopConfig = field(default_factory=StopConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    chat_template: str = "auto"
    """How conversations (lists of messages) become tokens: auto (the tokenizer's chat template, or plain "User: ..." / "Assistant: ..." turns when it has none), none (always those plain turns), or the path of a Jinja chat template. String prompts are used as written."""
    precision: Precision = "auto"
    """fp32, bf16 (autocast; log-probs, advantages and weights stay fp32), or auto."""
    gradient_checkpointing: bool = False
    """Recompute the policy's and value network's activations in the backward pass instead of keeping them (less memory, about a third more training compute)."""
    save_every: PositiveInt = 20
    """Steps between checkpoints."""
    samples_per_step: NonNegativeInt = 4
    """Completions written to samples.jsonl each step."""
    resume: bool = False
    """Continue from the latest checkpoint in output_dir."""
    seed: int = 0
    """Seed for prompt order, sampling and initialisation."""


@dataclass
class Rollout:
    """One batch of experience; T is the response length, P the (left-padded) prompt length."""

    query: torch.Tensor  # (B, P) prompt ids, left-padded
    query_mask: torch.Tensor  # (B, P) 1 on prompt tokens
    responses: torch.Tensor  # (B, T) sampled ids, pad after the first stop token (EOS, end of turn)
    mask: torch.Tensor  # (B, T) 1 on response tokens up to and including the first stop token
    ended: torch.Tensor  # (B,) True where the response emitted a stop token
    logprobs: torch.Tensor = None  # (B, T) log-probs of the sampled tokens under the policy that sampled them
    ref_logprobs: torch.Tensor = None  # (B, T) the same under the reference
    values: torch.Tensor = None  # (B, T) V(s_t), the state before response token t
    scores: torch.Tensor = None  # (B,) reward-source score after the missing-EOS penalty and clipping
    raw_scores: torch.Tensor = None  # (B,) reward-source score as returned
    kl: torch.Tensor = None  # (B, T) per-token KL estimate to the reference
    rewards: torch.Tensor = None  # (B, T) KL-shaped per-token rewards
    advantages: torch.Tensor = None  # (B, T) whitened GAE advantages
    returns: torch.Tensor = None  # (B, T) value targets

    def inputs(self, rows=slice(None)) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(input_ids, attention_mask, position_ids) of prompt + response for the given rows."""
        ids = torch.cat([self.query[rows], self.responses[rows]], 1)
        attention = torch.cat([self.query_mask[rows], self.mask[rows]], 1)
        return ids, attention, position_ids(attention)


class PolicyAndValue(torch.nn.Module):
    """The trained pair as one module (one optimiser, one data-parallel wrapper).

    The value comes from a separate network's per-token head (default, checklist item 8), or
    from a linear head on the policy's last hidden state (`head_on_policy`).
    """

    def __init__(self, policy, value_model=None, value_head: torch.nn.Linear | None = None):
        super().__init__()
        self.policy, self.value_model, self.value_head = policy, value_model, value_head

    def forward(self, input_ids, attention_mask, position_ids, response_length: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(logits (B, L, V), values (B, L)); given `response_length` T, the outputs at the T
        positions that predict response tokens alone, (B, T, V) and (B, T) (see `lm_logits`)."""
        kwargs = dict(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids)
        if self.value_head is not None:
            out = lm_output(self.policy, kwargs, response_length, output_hidden_states=True)
            values = self.value_head(out.hidden_states[-1]).squeeze(-1)
            logits = out.logits
        else:
            logits, values = lm_output(self.policy, kwargs, response_length).logits, self.values(**kwargs)
        if response_length is None:
            return logits, values
        return logits[:, :-1], response_slice(values, input_ids.shape[1] - response_length)

    def values(self, input_ids, attention_mask, position_ids) -> torch.Tensor:
        """(B, L) values from the separate value network alone (without a value head on the policy)."""
        model = self.value_model.get_base_model() if hasattr(self.value_model, "get_base_model") else self.value_model
        hidden = getattr(model, model.base_model_prefix)(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids).last_hidden_state
        return score_head(model)(hidden).squeeze(-1)


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


def build_models(config: PPOConfig, tokenizer, device):
    """(PolicyAndValue, reference or None): with LoRA and no separate `reference` the reference
    is the policy, adapters off."""
    policy = load_causal_lm(config.policy, tokenizer)
    separate = config.reference and config.reference != config.policy
    if not config.lora.enabled or separate:
        reference = load_causal_lm(config.reference or config.policy, tokenizer).to(device).eval().requires_grad_(False)
        dropout_off(reference)
    if config.lora.enabled:
        from rlhf.models import add_lora

        policy = add_lora(policy, config.lora, "CAUSAL_LM")
        reference = reference if separate else None
    dropout_off(policy)
    if config.gradient_checkpointing:
        training.enable_gradient_checkpointing(policy)
    if config.value.head_on_policy:
        hidden = policy.config.get_text_config().hidden_size
        head = torch.nn.Linear(hidden, 1)
        torch.nn.init.zeros_(head.weight), torch.nn.init.zeros_(head.bias)
        return PolicyAndValue(policy, value_head=head).to(device), reference
    source = config.value.model or (config.reward.path if config.reward.kind == "model" else config.policy)
    value_model = load_sequence_classifier(source, tokenizer, num_labels=1)
    if config.lora.enabled:
        from rlhf.models import add_lora

        value_model = add_lora(value_model, config.lora, "SEQ_CLS")
    dropout_off(value_model)
    if config.gradient_checkpointing:
        training.enable_gradient_checkpointing(value_model)
    return PolicyAndValue(policy, value_model=value_model).to(device), reference


@contextlib.contextmanager
def timed(timings: dict[str, float], key: str):
    """Add the wall time of the block to `timings[key]` (checklist item 20: time per phase)."""
    started = time.perf_counter()
    yield
    timings[key] = timings.get(key, 0.0) + time.perf_counter() - started


@torch.no_grad()
def rollout(
    model: PolicyAndValue, reference, prompts: list[list[int]], texts: list[Content], reward_source, config: PPOConfig, tokenizer, device, bf16: bool,
    generator: torch.Generator | None = None,
) -> tuple[Rollout, dict]:
    """Sample (from `generator`'s stream), score, and run the value, policy and reference forward
    passes, each phase timed. `texts` are the prompts as the records gave them (strings or
    messages), which the reward source renders itself."""
    timings: dict[str, float] = {}
    with timed(timings, "time/generate"):
        batch = generate(model.policy, prompts, tokenizer, config, device, bf16, generator)
    with timed(timings, "time/score"):
        completions = score(batch, texts, reward_source, tokenizer, config)
    with timed(timings, "time/value"):
        policy_and_value_forward(model, batch, config, device, bf16)
    with timed(timings, "time/reference"):
        reference_forward(model.policy, reference, batch, config, device, bf16)
    return batch, {"completions": completions, **timings}


@torch.no_grad()
def generate(policy, prompts: list[list[int]], tokenizer, config: PPOConfig, device, bf16: bool, generator: torch.Generator | None = None) -> Rollout:
    """A Rollout holding the left-padded prompts, the sampled responses with their masks, and the
    log-probs of sampling where they are the policy's own (checklist item 18). A response ends at
    its first stop token of the policy (`stop_token_ids`: EOS, end of turn, generation_config).

    The sampler runs in the weights' precision (fp32); its log-probs then match a forward pass of
    the policy to about 1e-5 (tests/test_sampling.py) and save one. Under bf16 autocast the
    training passes see other numbers, so the log-probs are recomputed in bf16 instead.
    """
    stop_ids = stop_token_ids(tokenizer, policy)
    samples = sample_with_logprobs(policy, prompts, tokenizer.pad_token_id, stop_ids, config.generation, generator)
    query, query_mask = pad(prompts, tokenizer.pad_token_id, side="left")
    responses = samples.responses.to(device)
    batch = Rollout(query.to(device), query_mask.to(device), responses, response_mask(responses, stop_ids), samples.ended.to(device))
    if not bf16:
        batch.logprobs = samples.logprobs.to(device)
    return batch


@torch.no_grad()
def score(batch: Rollout, texts: list[Content], reward_source, tokenizer, config: PPOConfig) -> list[str]:
    """Score the decoded completions (each up to its first stop token, special tokens skipped) into
    `batch.raw_scores` and `batch.scores` (after the missing-EOS penalty and clipping); returns the
    completions."""
    pad_id = tokenizer.pad_token_id
    completions = tokenizer.batch_decode(batch.responses * batch.mask + pad_id * (1 - batch.mask), skip_special_tokens=True)
    batch.raw_scores = reward_source(texts, completions).to(batch.responses.device)
    scores = batch.raw_scores.clone()
    if config.algo.missing_eos_penalty:
        scores = torch.where(batch.ended, scores, torch.full_like(scores, config.algo.missing_eos_penalty))
    if config.algo.score_clip:
        scores = scores.clamp(-config.algo.score_clip, config.algo.score_clip)
    batch.scores = scores
    return completions


@torch.no_grad()
def policy_and_value_forward(model: PolicyAndValue, batch: Rollout, config: PPOConfig, device, bf16: bool) -> None:
    """`batch.values`, and `batch.logprobs` unless sampling gave them: then a separate value
    network runs alone, and only a value head on the policy still needs the policy's pass."""
    temperature = config.generation.temperature or 1.0
    P, T = batch.query.shape[1], batch.responses.shape[1]
    values_only = batch.logprobs is not None and model.value_head is None
    logprobs, values = [], []
    for rows in chunks(len(batch.responses), config.algo.micro_batch_size):
        with training.autocast(device, bf16):
            if values_only:
                value = response_slice(model.values(*batch.inputs(rows)), P)
            else:
                logits, value = model(*batch.inputs(rows), response_length=T)
                logprobs.append(ops.logprobs_from_logits(logits, batch.responses[rows], temperature))
        values.append(value.float())
    batch.values = torch.cat(values)
    if logprobs:
        batch.logprobs = torch.cat(logprobs)


@torch.no_grad()
def reference_forward(policy, reference, batch: Rollout, config: PPOConfig, device, bf16: bool) -> None:
    """`batch.ref_logprobs`; with LoRA the reference is the policy with its adapters off (checklist item 9)."""
    temperature = config.generation.temperature or 1.0
    ref_logprobs = []
    for rows in chunks(len(batch.responses), config.algo.micro_batch_size):
        with training.autocast(device, bf16), (policy.disable_adapter() if reference is None else contextlib.nullcontext()):
            logits = lm_logits(policy if reference is None else reference, *batch.inputs(rows), batch.responses.shape[1])
        ref_logprobs.append(ops.logprobs_from_logits(logits, batch.responses[rows], temperature))
    batch.ref_logprobs = torch.cat(ref_logprobs)


def chunks(n: int, size: int) -> list[slice]:
    return [slice(i, min(i + size, n)) for i in range(0, n, size)]


def moments(x: torch.Tensor, mask: torch.Tensor, accelerator) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and unbiased variance of `x` over the mask, on all data-parallel processes together."""
    total, squares, n = accelerator.reduce(torch.stack([(x * mask).sum(), (x * x * mask).sum(), mask.sum()]), "sum")
    mean = total / n
    return mean, (squares / n - mean**2) * n / (n - 1).clamp(min=1)


def compute_advantages(batch: Rollout, beta: float, config: PPOConfig, accelerator) -> None:
    """KL-shaped rewards, optional reward whitening, GAE, and advantage whitening, in place.

    Whitening uses the moments of the whole batch, over every data-parallel process.
    """
    mask = batch.mask
    batch.rewards, batch.kl = ops.kl_shaped_rewards(batch.scores, batch.logprobs, batch.ref_logprobs, mask, beta, config.kl.estimator)
    if config.algo.whiten_rewards:
        batch.rewards = ops.masked_whiten(batch.rewards, mask, False, 1e-8, *moments(batch.rewards, mask, accelerator)) * mask
    advantages, batch.returns = ops.gae(batch.rewards, batch.values, mask, config.algo.gamma, config.algo.lam)
    batch.advantages = ops.masked_whiten(advantages, mask, True, 1e-8, *moments(advantages, mask, accelerator)) * mask


def ppo_loss(model, batch: Rollout, rows: torch.Tensor, config: PPOConfig, num_tokens: torch.Tensor, bf16: bool) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The combined objective L = L_policy + c1 L_value - c2 entropy on some rows of the batch.

    The forward pass may run in bf16; log-probs, ratios and losses are computed in fp32. Each
    term is a share of the mean over `num_tokens` (the tokens of the whole minibatch).
    """
    algo = config.algo
    temperature = config.generation.temperature or 1.0
    mask = batch.mask[rows]
    with training.autocast(batch.query.device, bf16):
        logits, values = model(*batch.inputs(rows), response_length=batch.responses.shape[1])
    logits, values = logits.float(), values.float()
    logprobs = ops.logprobs_from_logits(logits, batch.responses[rows], temperature)
    pg_loss, pg_stats = ops.policy_loss(logprobs, batch.logprobs[rows], batch.advantages[rows], mask, algo.clip, num_tokens)
    vf_loss, vf_stats = ops.value_loss(values, batch.values[rows], batch.returns[rows], mask, algo.value_clip, num_tokens)
    # With no entropy bonus the entropy is only logged: no gradient through it.
    entropy = ops.masked_sum(ops.entropy_from_logits(logits if algo.entropy_coef else logits.detach(), temperature), mask) / num_tokens
    loss = pg_loss + algo.vf_coef * vf_loss - algo.entropy_coef * entropy
    stats = {
        "loss/policy": pg_loss, "loss/value": vf_loss, "policy/entropy": entropy, "policy/clipfrac": pg_stats["clipfrac"],
        "policy/approx_kl": pg_stats["approx_kl"], "value/clipfrac": vf_stats["value_clipfrac"],
    }
    return loss, stats


def ppo_epochs(model, optimizer, scheduler, batch: Rollout, config: PPOConfig, accelerator, bf16: bool, generator: torch.Generator) -> dict[str, float]:
    """K epochs of clipped-PPO updates over shuffled minibatches, the learning-rate schedule
    stepping once per update; returns mean statistics, `train/lr` the mean rate they used."""
    algo = config.algo
    local_minibatch = algo.minibatch_size // accelerator.num_processes
    accumulation = local_minibatch // algo.micro_batch_size
    sums: dict[str, float] = {}
    updates = 0
    for _ in range(algo.epochs):
        order = torch.randperm(len(batch.scores), generator=generator).tolist()
        for start in range(0, len(order), local_minibatch):
            minibatch = order[start : start + local_minibatch]
            # every loss term is a mean over the minibatch's tokens on all processes together
            num_tokens = accelerator.reduce(batch.mask[minibatch].sum(), "sum").clamp(min=1)
            stats: dict[str, float] = {}
            for m in range(accumulation):
                rows = torch.tensor(minibatch[m * algo.micro_batch_size : (m + 1) * algo.micro_batch_size], device=accelerator.device)
                with accelerator.no_sync(model) if m < accumulation - 1 else contextlib.nullcontext():
                    loss, named = ppo_loss(model, batch, rows, config, num_tokens, bf16)
                    accelerator.backward(loss * accelerator.num_processes)  # DDP averages over processes
                for key, value in named.items():
                    stats[key] = stats.get(key, 0.0) + value.item()
            # shares of a minibatch mean: summed over processes they give the minibatch's value
            reduced = accelerator.reduce(torch.tensor(list(stats.values()), device=accelerator.device), "sum").tolist()
            stats = dict(zip(stats, reduced))
            if config.optim.grad_clip:
                stats["train/grad_norm"] = float(accelerator.clip_grad_norm_(model.parameters(), config.optim.grad_clip))
            stats["train/lr"] = optimizer.param_groups[0]["lr"]
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            updates += 1
            for key, value in stats.items():
                sums[key] = sums.get(key, 0.0) + value
    return {key: value / updates for key, value in sums.items()}


def updates_per_rollout(algo: PPOAlgoConfig) -> int:
    """Optimiser updates in one PPO step: an update per minibatch, every epoch."""
    return algo.epochs * (algo.batch_size // algo.minibatch_size)


def sampling_seed(seed: int, step: int, rank: int) -> int:
    """The seed of one process's sampling stream at one step: each data-parallel process draws
    its own completions, and a resumed run draws the ones it would have drawn."""
    return (seed * 1_000_003 + step) * 1_009 + rank


def step_metrics(batch: Rollout, completions: list[str], beta: float, accelerator) -> dict[str, float]:
    """Checklist item 20: what the rollout says about score, reward, KL, length and EOS, and how
    diverse its decoded completions are, over the rollouts of every data-parallel process."""
    # Every process gets every process's completions: a collapse guard then stops all of them.
    diversity = diagnostics.diversity(gather_object(completions))
    mask = batch.mask
    per_sequence = torch.stack(
        [batch.raw_scores, batch.scores, batch.rewards.sum(-1), batch.kl.sum(-1), mask.sum(-1).float(), batch.ended.float()], 1
    )
    raw, scores, rewards, kl, lengths, ended = accelerator.gather(per_sequence).T
    kl_sum, tokens, value_sum = accelerator.reduce(torch.stack([(batch.kl * mask).sum(), mask.sum(), (batch.values * mask).sum()]), "sum")
    _, residual_var = moments(batch.returns - batch.values, mask, accelerator)
    _, returns_var = moments(batch.returns, mask, accelerator)
    return {
        "score/mean": raw.mean().item(),
        "score/std": raw.std().item() if len(raw) > 1 else 0.0,
        "score/penalized_mean": scores.mean().item(),
        "reward/mean": rewards.mean().item(),
        "kl/sequence": kl.mean().item(),
        "kl/token": (kl_sum / tokens).item(),
        "kl/total": kl_sum.item(),
        "kl/beta": beta,
        "value/explained_variance": (1 - residual_var / returns_var.clamp(min=1e-8)).item(),
        "value/mean": (value_sum / tokens).item(),
        "response/length": lengths.mean().item(),
        "response/eos_fraction": ended.mean().item(),
        **{f"diversity/{key}": value for key, value in diversity.items()},
    }


GUARDED = ("kl/sequence", "diversity/distinct_per_100")
"""The rollout metrics the guards read; a checkpoint keeps them, so that a resumed run re-decides."""


def guard_stop(config: StopConfig, step: int, rollout: dict[str, float]) -> str | None:
    """The reason to stop at `step` before its update, or None. The guards look at the rollout,
    so that no update is made on a batch past them: the reward-hacking guard at its KL to the
    reference, the collapse guard at its distinct responses."""
    kl, distinct = rollout.get("kl/sequence"), rollout.get("diversity/distinct_per_100")
    if config.kl_budget is not None and kl is not None and kl > config.kl_budget:
        return f"KL budget exceeded at step {step}, before its update: mean KL per sequence {kl:.3f} > {config.kl_budget}"
    if config.min_distinct is not None and distinct is not None and distinct < config.min_distinct:
        return f"collapse guard at step {step}, before its update: {distinct:.1f} distinct responses per 100 prompts < {config.min_distinct}"
    return None


def warn_once(warned: set[str], step: int, metrics: dict[str, float], band: tuple[float, float] | None) -> None:
    """Log each kind of sign of collapse or over-optimisation (`diagnostics.signs`) at the first
    step that shows it; `warned` holds the kinds already logged."""
    numbers = {key.removeprefix("diversity/"): value for key, value in metrics.items() if key.startswith("diversity/")}
    for kind, sentence in diagnostics.signs({**numbers, "score": metrics["score/mean"]}, band).items():
        if kind not in warned:
            warned.add(kind)
            log.warning("ppo step %d: %s", step, sentence)


def should_stop(config: StopConfig, step: int, window: deque) -> str | None:
    """The reason to stop after `step`, or None."""
    if config.reward_threshold is not None and len(window) == config.window and sum(window) / len(window) >= config.reward_threshold:
        return f"reward threshold reached: mean score {sum(window) / len(window):.3f} over the last {config.window} steps >= {config.reward_threshold}"
    if step >= config.max_steps:
        return f"max steps reached ({config.max_steps})"
    return None


def check_config(config: PPOConfig, num_processes: int) -> None:
    """What the recipe alone decides: ranges, required keys, derived sizes (checked once, with a
    clear error when they do not divide), a reward source that can load."""
    algo, world = config.algo, num_processes
    check_ranges(config, "ppo")
    if not config.policy:
        raise ConfigError("ppo.policy is required: the SFT model to start from")
    if not config.prompts.train:
        raise ConfigError("ppo.prompts.train is required: one or more prompt files")
    if algo.batch_size % algo.minibatch_size:
        raise ConfigError(f"ppo.algo.minibatch_size: must divide ppo.algo.batch_size={algo.batch_size}, got {algo.minibatch_size}")
    if algo.minibatch_size % world:
        raise ConfigError(f"ppo.algo.minibatch_size: must be a multiple of the {world} processes, got {algo.minibatch_size}")
    if (algo.minibatch_size // world) % algo.micro_batch_size:
        raise ConfigError(
            f"ppo.algo.micro_batch_size: must divide the {algo.minibatch_size // world} rollouts per process of a minibatch "
            f"(ppo.algo.minibatch_size={algo.minibatch_size} over {world} process(es)), got {algo.micro_batch_size}"
        )
    check_reward_source(config.reward, "ppo.reward")


def validate(config: PPOConfig, num_processes: int) -> None:
    """What can be checked before loading prompts or a model: the recipe, the models' paths, and
    room for a prompt beside `max_new_tokens` in the policy's context."""
    check_config(config, num_processes)
    check_model_path("ppo.policy", config.policy)
    if config.reference:
        check_model_path("ppo.reference", config.reference)
    check_chat_template(config.chat_template, "ppo.chat_template")
    check_generation_room("ppo.generation.max_new_tokens", config.policy, config.generation.max_new_tokens)
    if config.value.model:
        check_model_path("ppo.value.model", config.value.model)
    check_reward_path(config.reward, "ppo.reward")


def train(config: PPOConfig) -> Path:
    """Run PPO; returns the path of the saved policy."""
    accelerator = training.make_accelerator()
    validate(config, accelerator.num_processes)
    device, bf16 = accelerator.device, training.use_bf16(config.precision, accelerator.device)
    torch.manual_seed(config.seed)
    out = Path(config.output_dir)
    checkpoint = training.latest_checkpoint(out) if config.resume else None

    records = load_prompts(config.prompts.train, config.prompts.skip_invalid)
    tokenizer = load_tokenizer(config.policy)
    use_chat_template(tokenizer, config.chat_template)
    model, reference = build_models(config, tokenizer, device)
    if checkpoint is not None:
        load_trained(model, checkpoint)
    max_prompt = context_length(model.policy.config) - config.generation.max_new_tokens
    records, prompts = encode_prompts(tokenizer, records, max_prompt, config.prompts.skip_invalid)
    reward_source = load_reward_source(config.reward, device)
    band = getattr(reward_source, "score_band", None)  # a trained reward model's held-out (p5, p95)

    optimizer, scheduler = training.make_optimizer(model, config.optim, config.stop.max_steps * updates_per_rollout(config.algo))
    model, optimizer = accelerator.prepare(model, optimizer)
    kl_controller = ops.AdaptiveKLController(config.kl.beta, config.kl.target, config.kl.horizon) if config.kl.adaptive else ops.FixedKLController(config.kl.beta)
    generator = torch.Generator().manual_seed(config.seed + 1)  # minibatch order
    state = {"epoch": 0, "batch": 0, "window": []}
    if checkpoint is not None:
        state = training.load_state(checkpoint, accelerator.process_index)
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        kl_controller.beta = state["beta"]
        generator.set_state(state["generator"])
    step = state.get("step", 0)
    window = deque(state["window"], maxlen=config.stop.window)
    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.yaml").write_text(yaml.safe_dump(to_dict(config), sort_keys=False))
        keep_steps_until(out / "samples.jsonl", step)
        log.info("ppo: %d prompts, batch %d, bf16=%s, lora=%s, value=%s", len(prompts), config.algo.batch_size, bf16, config.lora.enabled, "head on policy" if config.value.head_on_policy else "separate")
    tracker = Tracker(out, enabled=accelerator.is_main_process, resume_step=step)
    order = training.batches(len(prompts), config.algo.batch_size, config.seed, state["epoch"], state["batch"])
    bar = tqdm(total=config.stop.max_steps, initial=step, desc="ppo", disable=not accelerator.is_main_process, dynamic_ncols=True)
    # A run a guard stopped stays stopped, unless the guards now allow that step's rollout (a
    # checkpoint of an earlier release holds the KL alone, as "kl" and "kl_stopped").
    guarded = state.get("guarded", {"kl/sequence": state.get("kl")})
    stop = guard_stop(config.stop, step, guarded) if state.get("guard_stopped", state.get("kl_stopped")) else None
    reason = stop or (should_stop(config.stop, step, window) if step else None)
    warned: set[str] = set()
    if reason and checkpoint is not None:
        log.info("the run in %s had already stopped at step %d: %s", out, step, reason)
    while reason is None:
        epoch, index, indices = next(order)
        local = training.shard(indices, accelerator.process_index, accelerator.num_processes)
        unwrapped = accelerator.unwrap_model(model)
        unwrapped.eval()
        stream = torch.Generator(device).manual_seed(sampling_seed(config.seed, step, accelerator.process_index))
        batch, info = rollout(unwrapped, reference, [prompts[i] for i in local], [records[i].prompt for i in local], reward_source, config, tokenizer, device, bf16, stream)
        compute_advantages(batch, kl_controller.beta, config, accelerator)
        metrics = step_metrics(batch, info["completions"], kl_controller.beta, accelerator)
        if band is not None:
            metrics["score/above_band"] = float(metrics["score/mean"] > band[1])
        step += 1
        stop = guard_stop(config.stop, step, metrics)
        timings = {k: v for k, v in info.items() if k.startswith("time/")}
        if stop is None:
            model.train()
            with timed(timings, "time/train"):
                metrics.update(ppo_epochs(model, optimizer, scheduler, batch, config, accelerator, bf16, generator))
            kl_controller.update(metrics["kl/sequence"], config.algo.batch_size)
        metrics.update({**timings, **training.peak_memory()})
        window.append(metrics["score/mean"])
        tracker.log(step, metrics)
        if accelerator.is_main_process:
            write_samples(out / "samples.jsonl", step, [records[i].prompt for i in local], info["completions"], batch, config.samples_per_step)
            warn_once(warned, step, metrics, band)
        bar.update(1)
        bar.set_postfix(score=f"{metrics['score/mean']:.3f}", kl=f"{metrics['kl/sequence']:.2f}", beta=f"{kl_controller.beta:.3f}")
        reason = stop or should_stop(config.stop, step, window)
        if step % config.save_every == 0 or reason:
            rng = training.rng_states(accelerator)  # on every process
            if accelerator.is_main_process:
                position = {
                    "epoch": epoch, "batch": index + 1, "window": list(window), "beta": kl_controller.beta, "generator": generator.get_state(),
                    "guarded": {key: metrics[key] for key in GUARDED}, "guard_stopped": stop is not None,
                }
                save_trained(out, step, accelerator.unwrap_model(model), tokenizer, {**position, "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}, rng)
    bar.close()
    tracker.close()
    log.info("ppo stopped after step %d: %s", step, reason)
    path = out / "model"
    if accelerator.is_main_process:
        (out / "stop_reason.txt").write_text(reason + "\n")
        trained = accelerator.unwrap_model(model)
        save_model(trained.policy, tokenizer, path)
        if trained.value_model is not None:
            save_model(trained.value_model, tokenizer, out / "value")
    accelerator.wait_for_everyone()
    return path


def write_samples(path: Path, step: int, prompts: list[Content], completions: list[str], batch: Rollout, n: int) -> None:
    with path.open("a", encoding="utf-8") as f:
        for i in range(min(n, len(prompts))):
            record = {"step": step, "prompt": prompts[i], "completion": completions[i], "score": batch.raw_scores[i].item(), "ended": bool(batch.ended[i])}
            f.write(json.dumps(record, ensure_ascii=False) + "\n")


def save_trained(out: Path, step: int, model: PolicyAndValue, tokenizer, state: dict, rng: list[dict]) -> None:
    """A checkpoint: the policy (or its adapters) as `model/`, plus the value network or head."""
    path = training.save_checkpoint(out, step, model.policy, tokenizer, state, rng)
    if model.value_head is not None:
        torch.save(model.value_head.state_dict(), path / "value_head.pt")
    else:
        model.value_model.save_pretrained(path / "value")


def load_trained(model: PolicyAndValue, checkpoint: Path) -> None:
    """Load the trained weights of a checkpoint into freshly built models."""
    from safetensors.torch import load_file

    def load_into(module, directory: Path):
        files = sorted(directory.glob("*.safetensors"))
        weights = {k: v for f in files for k, v in load_file(f).items()}
        if hasattr(module, "get_base_model"):  # peft: the adapter weights
            from peft import set_peft_model_state_dict

            set_peft_model_state_dict(module, weights)
        else:
            missing, unexpected = module.load_state_dict(weights, strict=False)
            tied = set(getattr(module, "_tied_weights_keys", None) or [])
            if unexpected or set(missing) - tied:
                raise RuntimeError(f"{directory}: checkpoint does not match the model (missing {missing}, unexpected {unexpected})")

    load_into(model.policy, checkpoint / "model")
    if model.value_head is not None:
        model.value_head.load_state_dict(torch.load(checkpoint / "value_head.pt"))
    else:
        load_into(model.value_model, checkpoint / "value")
