"""Direct preference optimisation: the policy trained on preferences alone, no reward model, no sampling.

    rlhf dpo --config recipes/demo.yaml dpo.loss.beta=0.2

It reads the feedback formats of the reward model: a pair, or a ranking of K that gives its
K(K-1)/2 pairs weighted so that each ranking counts once (as `rlhf reward` weighs them), and
ratings, which pair up the completions of one prompt whose labels differ (the higher label
better; equal labels give no pair). A pair's `margin` is not used. Prompt and completion are
rendered as the reward model renders them (rlhf/encoding.py), and only completion tokens count.

The reference is the model the policy starts from (the SFT model); with LoRA it is the policy
with its adapters switched off, so no second copy is held. Its log-probs are computed once, in
one pass over the training and held-out data before the first step, and stored with the data:
training runs the policy alone. Variants (`loss.variant`, the math in `ops.dpo_loss`): sigmoid,
DPO's -log sigmoid(beta h) (Rafailov et al. 2023); ipo, (h - 1/(2 beta))^2 (Azar et al. 2023);
simpo, reference-free on log-probs averaged per token with a target margin gamma (Meng et al.
2024). Dropout is off throughout, so that the policy's log-probs at step 0 are the reference's.

Each logged step has TRL's names: `train/loss`, `rewards/chosen`, `rewards/rejected`,
`rewards/margins` and `rewards/accuracies` (the implicit rewards beta * log(pi / pi_ref)), and
each evaluation the same on held-out pairs under `eval/`. Writes `output_dir/model` (loads with
plain `AutoModelForCausalLM`), checkpoints, `metrics.jsonl`, TensorBoard events and
`summary.json` with the number of training records and pairs (the labels it used) and the
held-out metrics.
"""

from __future__ import annotations

import contextlib
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch

from rlhf import ops, training
from rlhf.config import ConfigError, NonNegative, Positive, PositiveInt, check_ranges
from rlhf.data import Comparison, Rating, content_key, keep_valid, load_feedback
from rlhf.encoding import FALLBACK_CHAT_TEMPLATE, check_chat_template, encode_completion, encode_prompt, pad, use_chat_template
from rlhf.models import LoraConfig, check_model_path, context_length, dropout_off, load_causal_lm, load_tokenizer, position_ids, save_model
from rlhf.training import DataConfig, OptimConfig, Precision

log = logging.getLogger(__name__)


@dataclass
class LossConfig:
    variant: Literal["sigmoid", "ipo", "simpo"] = "sigmoid"
    """sigmoid: DPO (Rafailov et al. 2023); ipo: IPO's squared loss (Azar et al. 2023); simpo: SimPO, average log-probs and no reference (Meng et al. 2024)."""
    beta: Positive = 0.1
    """Scale of the implicit reward beta * log(pi / pi_ref): larger keeps the policy closer to the reference (ipo aims at a log-ratio margin of 1 / (2 beta); simpo scales average log-probs, 2 to 2.5 in its paper)."""
    gamma: NonNegative = 0.0
    """simpo only: the target margin of the reward difference (about beta / 2 in its paper)."""


@dataclass
class DPOConfig:
    policy: str = ""
    """Model to start from, and the reference (usually the SFT model): a local path or a hub id."""
    output_dir: str = "runs/dpo"
    """Where the model, checkpoints and metrics go."""
    data: DataConfig = field(default_factory=lambda: DataConfig(eval_fraction=0.1))
    loss: LossConfig = field(default_factory=LossConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=5e-6, batch_size=32, micro_batch_size=8))
    chat_template: str = "auto"
    """How conversations (lists of messages) become tokens: auto (the tokenizer's chat template, or plain "User: ..." / "Assistant: ..." turns when it has none), none (always those plain turns), or the path of a Jinja chat template. String prompts are used as written."""
    precision: Precision = "auto"
    """fp32, bf16 (autocast, fp32 master weights), or auto: bf16 where the hardware runs it fast."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass instead of keeping them (less memory, about a third more compute)."""
    eval_every: PositiveInt = 100
    """Steps between held-out evaluations."""
    save_every: PositiveInt = 200
    """Steps between checkpoints."""
    log_every: PositiveInt = 10
    """Steps between metric lines."""
    resume: bool = False
    """Continue from the latest checkpoint in output_dir."""
    seed: int = 0
    """Seed for the data order and the split."""


@dataclass
class Example:
    """One training unit: the completions of one prompt and the pairs to compare among them."""

    sequences: list[list[int]]  # prompt + completion ids, one per completion
    prompt_length: int  # the prompt's tokens at the start of every sequence
    pairs: list[tuple[int, int]]  # (better, worse) indices into `sequences`
    records: int = 1  # feedback records it came from (a group of ratings is several)
    ref_logps: torch.Tensor | None = None  # (K,) summed log-probs of each completion under the reference


def encode_comparison(tokenizer, record: Comparison, max_length: int) -> Example:
    """A pair or a ranking (completions best first): every (better, worse) pair of it."""
    prompt = encode_prompt(tokenizer, record.prompt, max_length, record.source)
    sequences = [
        prompt + encode_completion(tokenizer, prompt, text, max_length, record.source, record.field_name(i), prompt=record.prompt)
        for i, text in enumerate(record.completions)
    ]
    k = len(sequences)
    return Example(sequences, len(prompt), [(i, j) for i in range(k) for j in range(i + 1, k)])


def encode_ratings(tokenizer, ratings: list[Rating], max_length: int) -> Example:
    """The ratings of one prompt: each completion against every one with a lower label."""
    first = ratings[0]
    prompt = encode_prompt(tokenizer, first.prompt, max_length, first.source)
    sequences = [prompt + encode_completion(tokenizer, prompt, r.completion, max_length, r.source, prompt=r.prompt) for r in ratings]
    pairs = [(i, j) for i, a in enumerate(ratings) for j, b in enumerate(ratings) if a.label > b.label]
    return Example(sequences, len(prompt), pairs, records=len(ratings))


def feedback_units(records: list) -> list:
    """Comparisons as they are, and ratings grouped by prompt; a group whose labels are all equal
    gives no pair and is left out (and counted in the log)."""
    units, groups = [], {}
    for record in records:
        if isinstance(record, Rating):
            groups.setdefault(content_key(record.prompt), []).append(record)
        else:
            units.append(record)
    paired = [group for group in groups.values() if len({r.label for r in group}) > 1]
    if len(paired) < len(groups):
        log.info("dpo: %d of %d prompts have ratings that are all equal: no pair, left out", len(groups) - len(paired), len(groups))
    return units + paired


def sequence_logprobs(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, response_mask: torch.Tensor) -> torch.Tensor:
    """(B,) log pi(completion | prompt): the log-probs of the tokens where `response_mask` is 1, summed.

    input_ids, attention_mask, response_mask: (B, L), padded on either side (positions count real
    tokens only). Position t's logits predict token t+1, so the first token of a sequence is never
    scored.
    """
    logits = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids(attention_mask)).logits
    logprobs = ops.logprobs_from_logits(logits[:, :-1], input_ids[:, 1:])
    return ops.masked_sum(logprobs, response_mask[:, 1:], dim=-1)


def completion_logprobs(model, examples: list[Example], pad_id: int, device, chunk: int = 16) -> torch.Tensor:
    """(N,) summed completion log-probs of every sequence of the examples, in order.

    The sequences go through the model right-padded in chunks of `chunk` of similar length, so
    that the completions of a ranking, which differ in length, carry little padding.
    """
    sequences = [s for e in examples for s in e.sequences]
    starts = [e.prompt_length for e in examples for _ in e.sequences]
    order = sorted(range(len(sequences)), key=lambda i: len(sequences[i]))
    parts = []
    for start in range(0, len(order), chunk):
        rows = order[start : start + chunk]
        ids, attention = pad([sequences[i] for i in rows], pad_id)
        response = attention.clone()
        for row, i in enumerate(rows):
            response[row, : starts[i]] = 0
        parts.append(sequence_logprobs(model, ids.to(device), attention.to(device), response.to(device)).float())
    inverse = torch.empty(len(order), dtype=torch.long)
    inverse[torch.tensor(order)] = torch.arange(len(order))
    return torch.cat(parts)[inverse.to(device)]


@torch.no_grad()
def reference_logprobs(model, examples: list[Example], pad_id: int, batch_size: int, device, bf16: bool, adapters_off: bool) -> None:
    """Store in every example the log-probs of its completions under the reference: `model`
    itself, or with `adapters_off` the LoRA policy with its adapters switched off."""
    model.eval()
    with model.disable_adapter() if adapters_off else contextlib.nullcontext():
        for i in range(0, len(examples), batch_size):
            chunk = examples[i : i + batch_size]
            with training.autocast(device, bf16):
                logps = completion_logprobs(model, chunk, pad_id, device).cpu()
            for example, part in zip(chunk, logps.split([len(e.sequences) for e in chunk])):
                example.ref_logps = part


def batch_loss(model, examples: list[Example], pad_id: int, device, loss: LossConfig, n_global: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """These examples' share of the mean loss over `n_global` examples, and the same shares of
    TRL's reward statistics. Every pair of an example weighs 1 / (its pairs * n_global)."""
    logps = completion_logprobs(model, examples, pad_id, device)
    better, worse, group, offset = [], [], [], 0
    for g, example in enumerate(examples):
        for b, w in example.pairs:
            better.append(offset + b)
            worse.append(offset + w)
            group.append(g)
        offset += len(example.sequences)
    better, worse, group = (torch.tensor(x, device=device) for x in (better, worse, group))
    if loss.variant == "simpo":
        lengths = torch.tensor([len(s) - e.prompt_length for e in examples for s in e.sequences], device=device)
        logps, ref = logps / lengths, torch.zeros_like(logps)
    else:
        ref = torch.cat([e.ref_logps for e in examples]).to(device)
    losses, chosen, rejected = ops.dpo_loss(logps[better], logps[worse], ref[better], ref[worse], loss.beta, loss.variant, loss.gamma)
    weight = 1.0 / (torch.bincount(group).float()[group] * n_global)
    stats = {
        "rewards/chosen": (chosen * weight).sum(),
        "rewards/rejected": (rejected * weight).sum(),
        "rewards/margins": ((chosen - rejected) * weight).sum(),
        "rewards/accuracies": ((chosen > rejected).float() * weight).sum(),
    }
    return (losses * weight).sum(), stats


@torch.no_grad()
def evaluate(model, examples: list[Example], pad_id: int, batch_size: int, device, bf16: bool, loss: LossConfig) -> dict[str, float]:
    """Held-out loss and reward statistics (each record weighing the same), and the pair count."""
    totals: dict[str, float] = {}
    for i in range(0, len(examples), batch_size):
        with training.autocast(device, bf16):
            value, stats = batch_loss(model, examples[i : i + batch_size], pad_id, device, loss, len(examples))
        for key, share in {"loss": value, **stats}.items():
            totals[key] = totals.get(key, 0.0) + share.item()
    return {**totals, "pairs": float(sum(len(e.pairs) for e in examples))}


def check_config(config: DPOConfig, num_processes: int) -> None:
    """What the recipe alone decides: ranges, required keys, sizes that divide."""
    check_ranges(config, "dpo")
    if not config.policy:
        raise ConfigError("dpo.policy is required: a local path or a hub id (usually the SFT model)")
    if not config.data.train:
        raise ConfigError("dpo.data.train is required: one or more feedback files")
    if config.loss.gamma and config.loss.variant != "simpo":
        raise ConfigError(f"dpo.loss.gamma: only the simpo variant has a target margin; set it to 0 for {config.loss.variant}, got {config.loss.gamma}")
    training.micro_batches_per_step(config.optim, num_processes, "dpo.optim")


def validate(config: DPOConfig, num_processes: int) -> None:
    """What can be checked before loading data or a model: the recipe, and the policy's path."""
    check_config(config, num_processes)
    check_model_path("dpo.policy", config.policy)
    check_chat_template(config.chat_template, "dpo.chat_template")


def train(config: DPOConfig) -> Path:
    """Train the policy on preferences with DPO (or IPO, SimPO); returns the path of the saved model."""
    accelerator = training.make_accelerator()
    validate(config, accelerator.num_processes)
    device, bf16 = accelerator.device, training.use_bf16(config.precision, accelerator.device)
    torch.manual_seed(config.seed)
    out = Path(config.output_dir)
    checkpoint = training.latest_checkpoint(out) if config.resume else None

    records = feedback_units(load_feedback(config.data.train, config.data.skip_invalid))
    eval_records = feedback_units(load_feedback(config.data.eval, config.data.skip_invalid)) if config.data.eval else None
    tokenizer = load_tokenizer(config.policy)
    use_chat_template(tokenizer, config.chat_template)
    load = lambda name: load_causal_lm(name, tokenizer)  # noqa: E731
    model = training.build_trainable(load, config.policy, config.lora, "CAUSAL_LM", checkpoint, config.gradient_checkpointing)
    dropout_off(model)
    max_length = min(config.data.max_length, context_length(model.config))
    if any(isinstance(r.prompt, list) for r in records) and not tokenizer.chat_template:
        tokenizer.chat_template = FALLBACK_CHAT_TEMPLATE  # saved with the model: what it was trained on
    encode = lambda unit: encode_ratings(tokenizer, unit, max_length) if isinstance(unit, list) else encode_comparison(tokenizer, unit, max_length)  # noqa: E731
    examples = keep_valid(records, encode, config.data.skip_invalid, "records that do not fit the model")
    if eval_records is not None:
        held_out = keep_valid(eval_records, encode, config.data.skip_invalid, "held-out records that do not fit the model")
    else:
        order = torch.randperm(len(examples), generator=torch.Generator().manual_seed(config.seed)).tolist()
        n_eval = max(1, int(len(examples) * config.data.eval_fraction))
        held_out, examples = [examples[i] for i in order[:n_eval]], [examples[i] for i in order[n_eval:]]

    pad_id, batch = tokenizer.pad_token_id, config.optim.micro_batch_size
    model.to(device)
    if config.loss.variant != "simpo":
        # The reference: the policy as it starts, or with adapters off under LoRA. A full-weight
        # run resumed from a checkpoint has moved on, so the reference is loaded for this pass.
        reference = load(config.policy).to(device) if checkpoint is not None and not config.lora.enabled else model
        reference_logprobs(reference, examples + held_out, pad_id, batch, device, bf16, adapters_off=config.lora.enabled)
        del reference

    def loss(model, micro: list[Example], whole: list[Example]):
        """This micro-batch's share of the mean loss over the global batch, and of the reward statistics."""
        return batch_loss(model, micro, pad_id, device, config.loss, config.optim.batch_size)

    labels = {"records": sum(e.records for e in examples), "pairs": sum(len(e.pairs) for e in examples)}
    if accelerator.is_main_process:
        log.info("dpo (%s, beta %g): %d train records (%d pairs) / %d held-out, bf16=%s, lora=%s", config.loss.variant, config.loss.beta,
                 labels["records"], labels["pairs"], len(held_out), bf16, config.lora.enabled)
    model, result = training.run_steps(
        "dpo", config, model, tokenizer, accelerator, examples, loss,
        lambda model: evaluate(model, held_out, pad_id, batch, device, bf16, config.loss), checkpoint, bf16,
        size=lambda example: sum(len(s) for s in example.sequences), throughput=("pairs", lambda whole: sum(len(e.pairs) for e in whole)),
    )
    path = out / "model"
    if accelerator.is_main_process:
        save_model(accelerator.unwrap_model(model), tokenizer, path)
        summary = {"variant": config.loss.variant, "beta": config.loss.beta, "train_records": labels["records"], "train_pairs": labels["pairs"], "eval": result}
        (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        log.info("dpo: held-out accuracy %.3f, reward margin %.3f; saved %s", result["rewards/accuracies"], result["rewards/margins"], path)
    accelerator.wait_for_everyone()
    return path
