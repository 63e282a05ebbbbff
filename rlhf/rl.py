"""The one RL trainer loop. PPO (rlhf/ppo.py) and the critic-free family (rlhf/grpo.py: GRPO,
Dr. GRPO, RLOO, REINFORCE++) configure it with an `Algorithm` and do not copy it.

One step: sample K responses per prompt from the engine, score them, run the forward passes
(old log-probs where the engine gave none, values where there is a critic, reference
log-probs), estimate advantages (the algorithm's), log metrics and check the guards, run epochs
of minibatch updates on the algorithm's loss plus the entropy bonus, adapt beta, sync the
engine, log. The run stops at `stop.max_steps`, at a mean-score threshold, when the KL to the
reference passes its budget, or when the responses collapse to a few, and says which. Each step
also logs how diverse its responses are and, against a reward model that stored its held-out
score band, whether the mean score is above it (`rlhf.diagnostics`). Writes `output_dir/model`
(the policy, loads with plain `AutoModelForCausalLM`), the critic where there is one,
checkpoints, `metrics.jsonl`, TensorBoard events and `samples.jsonl` (a few completions per step).
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Literal, Protocol

import torch
import yaml
from accelerate.utils import extract_model_from_parallel, gather_object
from tqdm.auto import tqdm

from rlhf import diagnostics, ops, training, vllm_engine
from rlhf.config import ConfigError, NonNegative, NonNegativeInt, Positive, PositiveInt, Probability, check_ranges, to_dict
from rlhf.data import Content, load_prompts
from rlhf.encoding import check_chat_template, encode_prompts, use_chat_template
from rlhf.models import (
    LoraConfig,
    PolicyAndValue,
    add_lora,
    check_generation_room,
    check_model_path,
    context_length,
    dropout_off,
    load_causal_lm,
    load_tokenizer,
    save_model,
    stop_token_ids,
)
from rlhf.rollout import LocalEngine, Rollout, RolloutEngine, generate, importance_weights, policy_forward, reference_forward, score, timed
from rlhf.sampling import SamplingConfig
from rlhf.scoring import (
    FunctionScore, RewardSourceConfig, check_references, check_reward_path, check_reward_source, load_function, load_references, load_reward_source,
)
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
class AlgoConfig:
    batch_size: PositiveInt = 64
    """Prompts per rollout (one step), over all processes."""
    minibatch_size: PositiveInt = 16
    """Rollouts (responses) per optimiser update."""
    micro_batch_size: PositiveInt = 16
    """Rollouts per forward pass on one process; gradients accumulate up to `minibatch_size`."""
    epochs: PositiveInt = 4
    """Passes over each rollout batch."""
    clip: Positive = 0.2
    """Policy ratio clipping epsilon."""
    entropy_coef: NonNegative = 0.0
    """Weight of the entropy bonus in the combined objective."""
    missing_eos_penalty: float = -1.0
    """Score given to a response that never emits a stop token, EOS or end of turn (0 turns the penalty off)."""
    score_clip: NonNegative = 0.0
    """Clip scores to [-score_clip, score_clip] (0: no clipping)."""


@dataclass
class OptimConfig:
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
    """Stop after this many steps."""
    reward_threshold: float | None = None
    """Stop when the mean score over the last `window` steps reaches this."""
    window: PositiveInt = 5
    """Steps averaged for the reward threshold."""
    kl_budget: Positive | None = None
    """Stop when a step's mean KL per sequence to the reference exceeds this (reward-hacking guard)."""
    min_distinct: NonNegative | None = None
    """Stop when a step's distinct responses per 100 prompts fall below this (collapse guard)."""


@dataclass
class RolloutConfig:
    engine: Literal["local", "vllm"] = "local"
    """What samples the rollouts: local (the project's sampler on the trained weights) or vllm (vLLM on the trainer's GPU, the weights loaded before every rollout; `pip install 'rlhf[vllm]'`, CUDA, one process)."""
    tis_cap: NonNegative = 2.0
    """Where the engine's log-probs are not the trainer's (vllm, or local under bf16), each token's policy-gradient loss is weighted by min(pi_trainer / pi_engine, tis_cap): truncated importance sampling. 0: no weights, the trainer's log-probs alone. The mismatch is logged either way."""
    gpu_memory_utilization: Probability = 0.3
    """vllm: the share of the GPU's memory vLLM takes for its weights and KV cache."""
    sleep: bool = True
    """vllm: release vLLM's weights and KV cache between rollouts (its sleep mode), so that the update has the memory."""
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = "auto"
    """vllm: the precision vLLM computes in (auto: vLLM's choice for the checkpoint)."""


@dataclass
class RLConfig:
    """What every RL stage's config holds; a stage adds its own `algo` section (and PPO its critic)."""

    policy: str = ""
    """Policy to start from (the SFT model): a local path or a hub id."""
    reference: str = ""
    """The frozen reference of the KL penalty; empty: the policy it starts from (`rlhf loop` keeps the SFT model here while later rounds start from the last policy)."""
    output_dir: str = "runs/rl"
    """Where the policy, critic, checkpoints, metrics and samples go."""
    prompts: PromptData = field(default_factory=PromptData)
    reward: RewardSourceConfig = field(default_factory=RewardSourceConfig)
    oracle: str = ""
    """Gold scorer `module:function` (the demo's gold labeler): each step's completions are scored by it too and logged as gold/mean, never trained on; `rlhf compare` draws the over-optimisation curve from it. Empty: none."""
    generation: SamplingConfig = field(default_factory=SamplingConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    kl: KLConfig = field(default_factory=KLConfig)
    algo: AlgoConfig = field(default_factory=AlgoConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
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


Reduce = Callable[[torch.Tensor], torch.Tensor]
"""Sums a tensor over every data-parallel process."""


class Algorithm(Protocol):
    """What an RL algorithm hands the loop (docs/architecture.md, "Adding an algorithm")."""

    name: str
    group_size: int
    """Responses sampled per prompt; a prompt's group stays on one process, in consecutive rows."""

    def critic(self, policy, tokenizer) -> tuple[torch.nn.Module | None, torch.nn.Linear | None]:
        """(value network, value head on the policy): at most one of them, or (None, None)."""

    def advantages(self, batch: Rollout, beta: float, reduce: Reduce) -> None:
        """Fill `batch.rewards`, `batch.advantages` (and `batch.returns` with a critic)."""

    def loss(self, logprobs, values, batch: Rollout, rows, num_tokens, beta: float) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The objective on `rows` (the entropy bonus is the loop's), each term a share of the mean
        over `num_tokens`, the tokens of the whole minibatch."""


def build_models(config: RLConfig, algorithm: Algorithm, tokenizer, device) -> tuple[PolicyAndValue, torch.nn.Module | None]:
    """(PolicyAndValue, reference or None): with LoRA and no separate `reference` the reference
    is the policy, adapters off (checklist item 9)."""
    policy = load_causal_lm(config.policy, tokenizer)
    separate = config.reference and config.reference != config.policy
    reference = None
    if not config.lora.enabled or separate:
        reference = load_causal_lm(config.reference or config.policy, tokenizer).to(device).eval().requires_grad_(False)
        dropout_off(reference)
    if config.lora.enabled:
        policy = add_lora(policy, config.lora, "CAUSAL_LM")
    dropout_off(policy)
    if config.gradient_checkpointing:
        training.enable_gradient_checkpointing(policy)
    value_model, value_head = algorithm.critic(policy, tokenizer)
    return PolicyAndValue(policy, value_model, value_head).to(device), reference


@torch.no_grad()
def rollout(
    model: PolicyAndValue, reference, prompts: list[list[int]], texts: list[Content], reward_source, config: RLConfig, tokenizer, device,
    bf16: bool, generator: torch.Generator | None = None, oracle=None, engine: RolloutEngine | None = None, fold: bool = False,
) -> tuple[Rollout, dict]:
    """Sample from `engine` (the project's sampler on the policy when None) with `generator`'s
    stream, score (and, given an `oracle`, gold-score), and run the policy, value and reference
    forward passes, each phase timed. `texts` are the prompts as the records gave them (strings
    or messages), which the reward source renders itself.

    With `fold` the pass for values and old log-probs is left to the update's forward
    (`fold_forward`, see `folds`): the batch then lacks them, and the KL, until that pass."""
    timings: dict[str, float] = {}
    temperature, micro = config.generation.temperature or 1.0, config.algo.micro_batch_size
    stop_ids = stop_token_ids(tokenizer, model.policy)
    engine = engine or LocalEngine(model.policy, tokenizer.pad_token_id, stop_ids, config.generation, bf16)
    with timed(timings, "time/generate"):
        batch = generate(engine, prompts, tokenizer.pad_token_id, stop_ids, device, generator)
    with timed(timings, "time/score"):
        completions = score(batch, texts, reward_source, tokenizer, config.algo.missing_eos_penalty, config.algo.score_clip)
    info = {"completions": completions}
    if oracle is not None:
        info["gold"] = oracle(texts, completions)
    if not fold:
        with timed(timings, "time/value"):
            policy_forward(model, batch, temperature, micro, device, bf16)
    with timed(timings, "time/reference"):
        reference_forward(model.policy, reference, batch, temperature, micro, device, bf16)
    if not fold:
        info.update(logprob_terms(batch, config))
    return batch, {**info, **timings}


def logprob_terms(batch: Rollout, config: RLConfig) -> dict[str, float]:
    """What needs the trainer's old log-probs: the per-token KL to the reference and, where the
    engine's log-probs are not the trainer's, the importance weights; returns the mismatch metrics."""
    batch.kl = ops.kl_penalty(batch.logprobs, batch.ref_logprobs, config.kl.estimator) * batch.mask
    return importance_weights(batch, config.rollout.tis_cap)


def folds(algo: AlgoConfig, group_size: int, num_processes: int) -> bool:
    """Whether a step makes one update, over one micro-batch per process. Then that update's
    forward pass, run before the advantages, also gives the rollout's values and (where the
    engine's are not the trainer's) old log-probs: the policy has not moved yet, so they are the
    same numbers, and the rollout saves a pass of the value network (and of the policy). TRL's
    GRPO takes the old log-probs so when it makes one update per generation."""
    one_update = updates_per_rollout(algo, group_size) == 1
    return one_update and algo.minibatch_size // num_processes == algo.micro_batch_size


@dataclass
class Forward:
    """A training forward pass's outputs on some rows, with their graph."""

    logprobs: torch.Tensor  # (b, T) log-probs of the sampled tokens at the sampling temperature
    entropy: torch.Tensor  # (b, T) entropy of each position's distribution (no gradient without an entropy bonus)
    values: torch.Tensor | None  # (b, T) V(s_t); None without a critic


def forward(model, batch: Rollout, rows: torch.Tensor, config: RLConfig, bf16: bool) -> Forward:
    """The training forward pass on some rows. It may run in bf16; log-probs and entropy are fp32."""
    with training.autocast(batch.query.device, bf16):
        logits, values = model(*batch.inputs(rows), response_length=batch.responses.shape[1])
    # With no entropy bonus the entropy is only logged: no gradient through it.
    temperature, entropy_grad = config.generation.temperature or 1.0, bool(config.algo.entropy_coef)
    logprobs, entropy = ops.logprobs_and_entropy(logits, batch.responses[rows], temperature, entropy_grad)
    return Forward(logprobs, entropy, None if values is None else values.float())


def fold_forward(model, batch: Rollout, config: RLConfig, bf16: bool) -> Forward:
    """The update's forward pass over every row of this process, with gradients, before the
    advantages (`folds`): it fills `batch.values` and, where the rollout has none,
    `batch.logprobs` (detached: the same numbers the update's loss takes), as the rollout's pass
    would have; the update's loss takes its outputs instead of running it again. The caller then
    computes `logprob_terms`."""
    out = forward(model, batch, torch.arange(len(batch.responses), device=batch.responses.device), config, bf16)
    if batch.logprobs is None:
        batch.logprobs = out.logprobs.detach()
    if out.values is not None:
        batch.values = out.values.detach()
    return out


def experience(
    model, algorithm: Algorithm, reference, prompts: list[list[int]], texts: list[Content], reward_source, config: RLConfig, tokenizer, device,
    bf16: bool, beta: float, reduce: Reduce, generator=None, oracle=None, engine: RolloutEngine | None = None, fold: bool = False,
) -> tuple[Rollout, dict, Forward | None]:
    """A step's experience: the rollout (on the unwrapped model), then with `fold` the update's
    forward pass for what the rollout left out (`folds`), then the algorithm's advantages. Returns
    the batch, the rollout's information and phase times, and the forward pass kept for the
    update (None without `fold`)."""
    unwrapped = extract_model_from_parallel(model)
    unwrapped.eval()
    batch, info = rollout(unwrapped, reference, prompts, texts, reward_source, config, tokenizer, device, bf16, generator, oracle, engine, fold)
    first = None
    if fold:
        model.train()
        with timed(info, "time/train"):
            first = fold_forward(model, batch, config, bf16)
        info.update(logprob_terms(batch, config))
    with timed(info, "time/advantages"):
        algorithm.advantages(batch, beta, reduce)
    return batch, info, first


def minibatch_loss(
    model, algorithm: Algorithm, batch: Rollout, rows: torch.Tensor, config: RLConfig, num_tokens, beta: float, bf16: bool,
    outputs: Forward | None = None,
):
    """The algorithm's objective on some rows of the batch minus the entropy bonus. `outputs`
    are the rows' forward pass where it has run already (`fold_forward`).

    The forward pass may run in bf16; log-probs, ratios and losses are computed in fp32."""
    out = outputs if outputs is not None else forward(model, batch, rows, config, bf16)
    loss, stats = algorithm.loss(out.logprobs, out.values, batch, rows, num_tokens, beta)
    entropy = ops.masked_sum(out.entropy, batch.mask[rows]) / num_tokens
    return loss - config.algo.entropy_coef * entropy, {**stats, "policy/entropy": entropy}


def update_epochs(
    model, algorithm: Algorithm, optimizer, scheduler, batch: Rollout, config: RLConfig, accelerator, bf16: bool, generator, beta: float,
    first: Forward | None = None,
) -> dict[str, float]:
    """Epochs of updates over shuffled minibatches, the learning-rate schedule stepping once per
    update; returns mean statistics, `train/lr` the mean rate they used. `first`: the one
    update's forward pass, run already (`fold_forward`); its rows are the minibatch."""
    algo = config.algo
    local_minibatch = algo.minibatch_size // accelerator.num_processes
    accumulation = local_minibatch // algo.micro_batch_size
    assert first is None or (algo.epochs == 1 and accumulation == 1), "a kept forward pass is the one update's only micro-batch (rl.folds)"
    sums: dict[str, float] = {}
    updates = 0
    for _ in range(algo.epochs):
        order = torch.randperm(len(batch.scores), generator=generator).tolist()
        for start in range(0, len(order), local_minibatch):
            # the kept pass ran on the rows in their order: it is the one minibatch (asserted above)
            minibatch = order[start : start + local_minibatch] if first is None else list(range(len(order)))
            # every loss term is a mean over the minibatch's tokens on all processes together
            num_tokens = accelerator.reduce(batch.mask[minibatch].sum(), "sum").clamp(min=1)
            stats: dict[str, float] = {}
            for m in range(accumulation):
                rows = torch.tensor(minibatch[m * algo.micro_batch_size : (m + 1) * algo.micro_batch_size], device=accelerator.device)
                with accelerator.no_sync(model) if m < accumulation - 1 else contextlib.nullcontext():
                    loss, named = minibatch_loss(model, algorithm, batch, rows, config, num_tokens, beta, bf16, first)
                    first = None
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


def updates_per_rollout(algo: AlgoConfig, group_size: int) -> int:
    """Optimiser updates in one step: an update per minibatch of the batch's responses, every epoch."""
    return algo.epochs * (algo.batch_size * group_size // algo.minibatch_size)


def sampling_seed(seed: int, step: int, rank: int) -> int:
    """The seed of one process's sampling stream at one step: each data-parallel process draws
    its own completions, and a resumed run draws the ones it would have drawn."""
    return (seed * 1_000_003 + step) * 1_009 + rank


def step_metrics(batch: Rollout, completions: list[str], beta: float, accelerator) -> dict[str, float]:
    """Checklist item 20: what the rollout says about score, reward, KL, length and EOS (and the
    critic, where there is one), and how diverse its decoded completions are, over the rollouts of
    every data-parallel process."""
    # Every process gets every process's completions: a collapse guard then stops all of them.
    diversity = diagnostics.diversity(gather_object(completions))
    mask = batch.mask
    per_sequence = torch.stack(
        [batch.raw_scores, batch.scores, batch.rewards.sum(-1), batch.kl.sum(-1), mask.sum(-1).float(), batch.ended.float()], 1
    )
    raw, scores, rewards, kl, lengths, ended = accelerator.gather(per_sequence).T
    kl_sum, tokens = accelerator.reduce(torch.stack([(batch.kl * mask).sum(), mask.sum()]), "sum")
    metrics = {
        "score/mean": raw.mean().item(),
        "score/std": raw.std().item() if len(raw) > 1 else 0.0,
        "score/penalized_mean": scores.mean().item(),
        "reward/mean": rewards.mean().item(),
        "kl/sequence": kl.mean().item(),
        "kl/token": (kl_sum / tokens).item(),
        "kl/total": kl_sum.item(),
        "kl/beta": beta,
        "response/length": lengths.mean().item(),
        "response/eos_fraction": ended.mean().item(),
        **{f"diversity/{key}": value for key, value in diversity.items()},
    }
    if batch.values is not None:
        reduce = lambda t: accelerator.reduce(t, "sum")  # noqa: E731
        _, residual_var = ops.moments(batch.returns - batch.values, mask, reduce)
        _, returns_var = ops.moments(batch.returns, mask, reduce)
        metrics["value/explained_variance"] = (1 - residual_var / returns_var.clamp(min=1e-8)).item()
        metrics["value/mean"] = (reduce((batch.values * mask).sum()) / tokens).item()
    return metrics


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


def warn_once(name: str, warned: set[str], step: int, metrics: dict[str, float], band: tuple[float, float] | None) -> None:
    """Log each kind of sign of collapse or over-optimisation (`diagnostics.signs`) at the first
    step that shows it; `warned` holds the kinds already logged."""
    numbers = {key.removeprefix("diversity/"): value for key, value in metrics.items() if key.startswith("diversity/")}
    for kind, sentence in diagnostics.signs({**numbers, "score": metrics["score/mean"]}, band).items():
        if kind not in warned:
            warned.add(kind)
            log.warning("%s step %d: %s", name, step, sentence)


def should_stop(config: StopConfig, step: int, window: deque) -> str | None:
    """The reason to stop after `step`, or None."""
    if config.reward_threshold is not None and len(window) == config.window and sum(window) / len(window) >= config.reward_threshold:
        return f"reward threshold reached: mean score {sum(window) / len(window):.3f} over the last {config.window} steps >= {config.reward_threshold}"
    if step >= config.max_steps:
        return f"max steps reached ({config.max_steps})"
    return None


def check_config(config: RLConfig, num_processes: int, section: str, group_size: int = 1) -> None:
    """What the recipe alone decides: ranges, required keys, derived sizes (checked once, with a
    clear error when they do not divide), a reward source that can load."""
    algo, world = config.algo, num_processes
    check_ranges(config, section)
    if not config.policy:
        raise ConfigError(f"{section}.policy is required: the SFT model to start from")
    if not config.prompts.train:
        raise ConfigError(f"{section}.prompts.train is required: one or more prompt files")
    rollouts = algo.batch_size * group_size
    per_step = f"{section}.algo.batch_size={algo.batch_size}" if group_size == 1 else f"the {rollouts} responses of a step ({section}.algo.batch_size={algo.batch_size} x group_size={group_size})"
    if rollouts % algo.minibatch_size:
        raise ConfigError(f"{section}.algo.minibatch_size: must divide {per_step}, got {algo.minibatch_size}")
    if algo.minibatch_size % world:
        raise ConfigError(f"{section}.algo.minibatch_size: must be a multiple of the {world} processes, got {algo.minibatch_size}")
    if (algo.minibatch_size // world) % algo.micro_batch_size:
        raise ConfigError(
            f"{section}.algo.micro_batch_size: must divide the {algo.minibatch_size // world} rollouts per process of a minibatch "
            f"({section}.algo.minibatch_size={algo.minibatch_size} over {world} process(es)), got {algo.micro_batch_size}"
        )
    check_reward_source(config.reward, f"{section}.reward")
    if config.rollout.engine == "vllm" and world > 1:
        raise ConfigError(f"{section}.rollout.engine: vllm runs in one process on one GPU, got {world} processes (use engine: local)")
    if config.oracle:
        load_function(config.oracle, f"{section}.oracle")


def validate(config: RLConfig, num_processes: int, section: str, group_size: int = 1) -> None:
    """What can be checked before loading a model: the recipe, the models' paths, room for a prompt
    beside `max_new_tokens` in the policy's context, and a reference response for every prompt
    where a judge compares with them."""
    check_config(config, num_processes, section, group_size)
    check_model_path(f"{section}.policy", config.policy)
    if config.reference:
        check_model_path(f"{section}.reference", config.reference)
    check_chat_template(config.chat_template, f"{section}.chat_template")
    check_generation_room(f"{section}.generation.max_new_tokens", config.policy, config.generation.max_new_tokens)
    check_reward_path(config.reward, f"{section}.reward")
    if config.rollout.engine == "vllm":
        check_vllm(f"{section}.rollout.engine")
    if config.reward.kind == "judge" and config.reward.reference:
        prompts = [(r.prompt, r.source) for r in load_prompts(config.prompts.train, config.prompts.skip_invalid)]
        check_references(load_references(config.reward.reference), config.reward.reference, prompts, f"{section}.reward.reference")


def check_vllm(key: str) -> None:
    """Refuse the vllm engine where vLLM is not installed or there is no GPU."""
    import importlib.util

    if importlib.util.find_spec("vllm") is None:
        raise ConfigError(f"{key}: vllm is not installed ({vllm_engine.INSTALL}); engine: local needs nothing more")
    if not torch.cuda.is_available():
        raise ConfigError(f"{key}: vllm needs a CUDA GPU and none is visible; engine: local samples on the CPU")


def make_engine(config: RLConfig, policy, tokenizer, bf16: bool) -> RolloutEngine:
    """The rollout engine `config.rollout.engine` names, on the policy being trained."""
    stop_ids = stop_token_ids(tokenizer, policy)
    if config.rollout.engine == "local":
        return LocalEngine(policy, tokenizer.pad_token_id, stop_ids, config.generation, bf16)
    # vLLM starts from the policy as loaded here (its vocabulary fitted to the tokenizer's pad and
    # added tokens), so that the weights it is given later have the shapes of its own.
    start = save_model(policy, tokenizer, Path(config.output_dir) / "vllm_start")
    rollout = config.rollout
    return vllm_engine.VLLMEngine(
        str(start), policy, tokenizer.pad_token_id, stop_ids, config.generation, gpu_memory_utilization=rollout.gpu_memory_utilization,
        sleep=rollout.sleep, dtype=rollout.dtype, max_model_len=context_length(policy.config), seed=config.seed,
    )


def train(config: RLConfig, algorithm: Algorithm) -> Path:
    """Run the algorithm; returns the path of the saved policy. The stage has validated `config`."""
    accelerator = training.make_accelerator()
    device, bf16 = accelerator.device, training.use_bf16(config.precision, accelerator.device)
    torch.manual_seed(config.seed)
    out, K = Path(config.output_dir), algorithm.group_size
    checkpoint = training.latest_checkpoint(out) if config.resume else None

    records = load_prompts(config.prompts.train, config.prompts.skip_invalid)
    tokenizer = load_tokenizer(config.policy)
    use_chat_template(tokenizer, config.chat_template)
    model, reference = build_models(config, algorithm, tokenizer, device)
    if checkpoint is not None:
        training.load_trained(model, checkpoint)
    max_prompt = context_length(model.policy.config) - config.generation.max_new_tokens
    records, prompts = encode_prompts(tokenizer, records, max_prompt, config.prompts.skip_invalid)
    reward_source = load_reward_source(config.reward, device)
    band = getattr(reward_source, "score_band", None)  # a trained reward model's held-out (p5, p95)
    oracle = FunctionScore(config.oracle) if config.oracle else None

    optimizer, scheduler = training.make_optimizer(model, config.optim, config.stop.max_steps * updates_per_rollout(config.algo, K))
    model, optimizer = accelerator.prepare(model, optimizer)
    unwrapped = accelerator.unwrap_model(model)
    engine = make_engine(config, unwrapped.policy, tokenizer, bf16)
    fold = folds(config.algo, K, accelerator.num_processes)
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
        critic = "value head on policy" if unwrapped.value_head is not None else "separate" if unwrapped.value_model is not None else "none"
        log.info("%s: %d prompts, batch %d x %d, bf16=%s, lora=%s, critic=%s", algorithm.name, len(prompts), config.algo.batch_size, K, bf16, config.lora.enabled, critic)
        if fold:
            log.info("one update per step: its forward pass gives the rollout's values and old log-probs (no pass of their own)")
    tracker = Tracker(out, enabled=accelerator.is_main_process, resume_step=step)
    order = training.batches(len(prompts), config.algo.batch_size, config.seed, state["epoch"], state["batch"])
    bar = tqdm(total=config.stop.max_steps, initial=step, desc=algorithm.name, disable=not accelerator.is_main_process, dynamic_ncols=True)
    # A run a guard stopped stays stopped, unless the guards now allow that step's rollout (a
    # checkpoint of an earlier release holds the KL alone, as "kl" and "kl_stopped").
    guarded = state.get("guarded", {"kl/sequence": state.get("kl")})
    stop = guard_stop(config.stop, step, guarded) if state.get("guard_stopped", state.get("kl_stopped")) else None
    reason = stop or (should_stop(config.stop, step, window) if step else None)
    warned: set[str] = set()
    reduce = lambda t: accelerator.reduce(t, "sum")  # noqa: E731
    if reason and checkpoint is not None:
        log.info("the run in %s had already stopped at step %d: %s", out, step, reason)
    while reason is None:
        epoch, index, indices = next(order)
        local = [i for i in training.shard(indices, accelerator.process_index, accelerator.num_processes) for _ in range(K)]
        texts = [records[i].prompt for i in local]
        stream = torch.Generator(device).manual_seed(sampling_seed(config.seed, step, accelerator.process_index))
        batch, info, first = experience(
            model, algorithm, reference, [prompts[i] for i in local], texts, reward_source, config, tokenizer, device, bf16, kl_controller.beta,
            reduce, stream, oracle, engine, fold,
        )
        metrics = step_metrics(batch, info["completions"], kl_controller.beta, accelerator)
        if oracle is not None:
            metrics["gold/mean"] = accelerator.gather(info["gold"].to(device)).mean().item()
        if band is not None:
            metrics["score/above_band"] = float(metrics["score/mean"] > band[1])
        metrics.update(getattr(reward_source, "metrics", dict)())  # a judge's cache hit rate
        metrics.update({key: value for key, value in info.items() if key.startswith("rollout/")})  # engine against trainer
        step += 1
        stop = guard_stop(config.stop, step, metrics)
        timings = {k: v for k, v in info.items() if k.startswith("time/")}
        if stop is None:
            model.train()
            with timed(timings, "time/train"):
                metrics.update(update_epochs(model, algorithm, optimizer, scheduler, batch, config, accelerator, bf16, generator, kl_controller.beta, first))
            kl_controller.update(metrics["kl/sequence"], config.algo.batch_size * K)
            engine.sync(unwrapped.policy)
        first = None  # the kept pass, used or not (a guard stopped the run): its graph goes
        metrics.update({**timings, **training.peak_memory()})
        window.append(metrics["score/mean"])
        tracker.log(step, metrics)
        if accelerator.is_main_process:
            write_samples(out / "samples.jsonl", step, texts, info["completions"], batch, config.samples_per_step)
            warn_once(algorithm.name, warned, step, metrics, band)
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
                training.save_trained(out, step, unwrapped, tokenizer, {**position, "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}, rng)
    bar.close()
    tracker.close()
    log.info("%s stopped after step %d: %s", algorithm.name, step, reason)
    path = out / "model"
    if accelerator.is_main_process:
        (out / "stop_reason.txt").write_text(reason + "\n")
        save_model(unwrapped.policy, tokenizer, path)
        if unwrapped.value_model is not None:
            save_model(unwrapped.value_model, tokenizer, out / "value")
    accelerator.wait_for_everyone()
    return path


def write_samples(path: Path, step: int, prompts: list[Content], completions: list[str], batch: Rollout, n: int) -> None:
    with path.open("a", encoding="utf-8") as f:
        for i in range(min(n, len(prompts))):
            record = {"step": step, "prompt": prompts[i], "completion": completions[i], "score": batch.raw_scores[i].item(), "ended": bool(batch.ended[i])}
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
