"""Reward model: a scalar head on a transformer, trained on preferences, rankings or ratings.

    rlhf reward --config recipes/demo.yaml reward.optim.epochs=2

Pairs and rankings train with -log sigmoid(r_better - r_worse - margin); a ranking of K gives its
K(K-1)/2 pairs, kept in one batch and weighted so that each ranking counts once (InstructGPT).
Ratings train pointwise: a 0/1 thumbs-up with a logistic loss, a scalar score by regression.
After training a bias (and optionally a gain) is fitted so that scores of reference completions
have mean 0 (std 1), stored in the model's config as `reward_bias` / `reward_gain`:

    score = reward_gain * (logit + reward_bias)

The 5th and 95th percentiles of the held-out completions' scores, the range the model's accuracy
was measured on, are stored beside them as `reward_score_band` (`rlhf.diagnostics` warns when a
policy's mean score passes the upper one). Writes `output_dir/model` (loads with plain
`AutoModelForSequenceClassification`), checkpoints, `metrics.jsonl`, TensorBoard events and
`eval.json` with the held-out accuracy and margin, the bias, gain and `score_band`.

A personal reward model (`reward.personal.enabled`) knows who judged: beside the pooled score,
column 0 of the head, it has one column per labeler of the training data, `d_j`, which learns
where labeler j departs from the pool. Column 0 trains on every label, `s0 + d_j` on labeler
j's labels. Labeler j's score is shrunk towards the pooled one by how many labels n_j they gave,

    score_j = gain_j * (s0 + n_j / (n_j + prior_labels) * d_j + bias_j)

with its own bias and gain, stored in the config as `reward_labelers` (docs/personal.md). Plain
transformers reads the pooled score as `logits[:, 0]`. eval.json then holds, per labeler, the
accuracy on their held-out labels of the pooled score against their own, and the held-out
comparisons where the two disagree most.
"""

from __future__ import annotations

import json
import logging
import random
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import AutoConfig

from rlhf import ops, training
from rlhf.config import ConfigError, NonNegative, PositiveInt, check_ranges
from rlhf.data import Comparison, Content, DataError, Rating, keep_valid, load_feedback, load_prompts
from rlhf.encoding import check_chat_template, encode_completion, encode_prompt, encode_prompts, pad, use_chat_template
from rlhf.models import (
    LoraConfig,
    check_generation_room,
    check_model_path,
    context_length,
    dropout_off,
    load_causal_lm,
    load_sequence_classifier,
    load_tokenizer,
    save_model,
    score_head,
    trained_outputs,
)
from rlhf.sampling import SamplingConfig, sample_texts
from rlhf.scoring import SequenceClassifierScore
from rlhf.training import DataConfig, OptimConfig, Precision

log = logging.getLogger(__name__)


@dataclass
class NormalizeConfig:
    policy: str = ""
    """Model whose samples are the reference completions; empty: the completions of the training data."""
    prompts: list[str] = field(default_factory=list)
    """Prompt files to sample reference completions from (with `policy`)."""
    num_samples: PositiveInt = 256
    """Reference completions to score."""
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    scale: bool = False
    """Also fit a gain so that reference scores have standard deviation 1."""


@dataclass
class PersonalConfig:
    enabled: bool = False
    """Condition the reward model on the labeler: a score per labeler beside the pooled one (the records' `labeler` field)."""
    prior_labels: PositiveInt = 50
    """Shrinkage: a labeler with n labels gets n / (n + prior_labels) of their own departure from the pooled score."""
    penalty: NonNegative = 0.01
    """Weight of the mean squared departure d_j from the pooled score in the loss (keeps the per-labeler part small where labels say little)."""
    min_labels: PositiveInt = 1
    """Labelers with fewer training labels get no column of their own (their labels still train the pooled score)."""


@dataclass
class RewardConfig:
    model: str = ""
    """Model to start from (usually the SFT model): a local path or a hub id."""
    output_dir: str = "runs/reward"
    """Where the model, checkpoints and metrics go."""
    data: DataConfig = field(default_factory=lambda: DataConfig(eval_fraction=0.1))
    lora: LoraConfig = field(default_factory=LoraConfig)
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=5e-5, batch_size=32, micro_batch_size=16))
    normalize: NormalizeConfig = field(default_factory=NormalizeConfig)
    personal: PersonalConfig = field(default_factory=PersonalConfig)
    chat_template: str = "auto"
    """How conversations (lists of messages) become tokens: auto (the tokenizer's chat template, or plain "User: ..." / "Assistant: ..." turns when it has none), none (always those plain turns), or the path of a Jinja chat template. String prompts are used as written."""
    precision: Precision = "auto"
    """fp32, bf16 (autocast, fp32 master weights), or auto: bf16 where the hardware runs it fast."""
    disable_dropout: bool = True
    """Train without dropout, as TRL's and OpenRLHF's reward trainers do: scores stay deterministic."""
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
    """Seed for the data order, the split and the head initialisation."""


@dataclass
class Example:
    """One training unit: a comparison (completions best first) or a rating (one completion)."""

    sequences: list[list[int]]
    margin: float = 0.0
    label: float | None = None
    labeler: str | None = None
    source: str = ""
    """Where the record came from (file:line)."""


def encode_feedback(tokenizer, record: Comparison | Rating, max_length: int) -> Example:
    """The sequences of a record, prompt and completion rendered as `SequenceClassifierScore` renders them."""
    prompt = encode_prompt(tokenizer, record.prompt, max_length, record.source)
    if isinstance(record, Rating):
        completion = encode_completion(tokenizer, prompt, record.completion, max_length, record.source, prompt=record.prompt)
        return Example([prompt + completion], label=record.label, labeler=record.labeler, source=record.source)
    sequences = [
        prompt + encode_completion(tokenizer, prompt, text, max_length, record.source, record.field_name(i), prompt=record.prompt)
        for i, text in enumerate(record.completions)
    ]
    return Example(sequences, margin=record.margin, labeler=record.labeler, source=record.source)


def forward_scores(model, sequences: list[list[int]], pad_id: int, device, chunk: int = 16) -> torch.Tensor:
    """(N, C) raw scores, read by the model at the last real token of each right-padded sequence
    (C = 1, or 1 + the labelers of a personal reward model).

    The sequences go through the model in chunks of `chunk` of similar length, so that the
    completions of a comparison, which differ in length, carry little padding (about 40% of the
    demo's rankings' tokens when padded together, under 10% this way).
    """
    order = sorted(range(len(sequences)), key=lambda i: len(sequences[i]))
    parts = []
    for start in range(0, len(order), chunk):
        ids, mask = pad([sequences[i] for i in order[start : start + chunk]], pad_id)
        parts.append(model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits.float())
    inverse = torch.empty(len(order), dtype=torch.long)
    inverse[torch.tensor(order)] = torch.arange(len(order))
    return torch.cat(parts)[inverse.to(device)]


def comparison_loss(scores: torch.Tensor, examples: list[Example], n_global: int) -> torch.Tensor:
    """Pairwise loss over every pair of every comparison; each comparison weighs 1 / n_global."""
    better, worse, group = ops.ranking_pairs([len(e.sequences) for e in examples])
    pairs_per_group = torch.bincount(group).float()
    weight = 1.0 / (pairs_per_group[group] * n_global)
    margin = torch.tensor([examples[g].margin for g in group.tolist()], device=scores.device)
    return ops.pairwise_loss(scores[better], scores[worse], margin, weight.to(scores.device))


def rating_loss(scores: torch.Tensor, labels: torch.Tensor, binary: bool, n_global: int) -> torch.Tensor:
    """Pointwise loss summed over the local ratings and divided by the global batch size."""
    if binary:
        return F.binary_cross_entropy_with_logits(scores, labels, reduction="sum") / n_global
    return F.mse_loss(scores, labels, reduction="sum") / n_global


@dataclass
class LabelerHeads:
    """The labelers of a personal reward model: each one's column of the head and label count."""

    columns: dict[str, int]
    labels: dict[str, int]
    prior_labels: int

    @classmethod
    def of(cls, examples: list[Example], config: PersonalConfig) -> "LabelerHeads":
        counts = Counter(e.labeler for e in examples if e.labeler)
        names = sorted(name for name, n in counts.items() if n >= config.min_labels)
        return cls({name: 1 + i for i, name in enumerate(names)}, {name: counts[name] for name in names}, config.prior_labels)

    def weight(self, name: str) -> float:
        """How much of labeler `name`'s own departure from the pooled score their score keeps."""
        return self.labels[name] / (self.labels[name] + self.prior_labels)

    def own(self, scores: torch.Tensor, name: str, shrink: bool = True) -> torch.Tensor:
        """(N,) labeler `name`'s raw scores from (N, C) raw columns."""
        return scores[:, 0] + (self.weight(name) if shrink else 1.0) * scores[:, self.columns[name]]

    def stored(self) -> dict[str, dict]:
        return {name: {"column": j, "labels": self.labels[name], "weight": self.weight(name)} for name, j in self.columns.items()}


def pair_margins(scores: torch.Tensor, examples: list[Example]) -> tuple[torch.Tensor, torch.Tensor]:
    """(margins r_better - r_worse, the example of each pair) over the examples' pairs; for
    ratings the pairs are all items with different labels, the higher label better."""
    if examples and examples[0].label is not None:
        labels = torch.tensor([e.label for e in examples])
        better, worse = torch.nonzero(labels[:, None] > labels[None, :], as_tuple=True)
        return scores[better] - scores[worse], better
    better, worse, group = ops.ranking_pairs([len(e.sequences) for e in examples])
    return scores[better] - scores[worse], group


def accuracy(margins: torch.Tensor) -> float:
    """Share of pairs ranked the right way round, ties counting half."""
    return ((margins > 0).float() + 0.5 * (margins == 0).float()).mean().item()


@torch.no_grad()
def example_scores(model, examples: list[Example], pad_id: int, batch_size: int, device, bf16: bool) -> torch.Tensor:
    """(N, C) raw scores of every sequence of the examples, in order, on the CPU."""
    scores = []
    for i in range(0, len(examples), batch_size):
        chunk = examples[i : i + batch_size]
        with training.autocast(device, bf16):
            scores.append(forward_scores(model, [s for e in chunk for s in e.sequences], pad_id, device).cpu())
    return torch.cat(scores)


@torch.no_grad()
def evaluate(model, examples: list[Example], pad_id: int, batch_size: int, device, bf16: bool) -> dict[str, float]:
    """Held-out pairwise accuracy of the pooled score (ties count half) and mean margin r_better - r_worse.

    For ratings the pairs are all held-out items with different labels, the higher label better.
    """
    margins, _ = pair_margins(example_scores(model, examples, pad_id, batch_size, device, bf16)[:, 0], examples)
    return {"accuracy": accuracy(margins), "margin": margins.mean().item(), "pairs": float(len(margins))}


def sequence_rows(examples: list[Example], index: list[int]) -> torch.Tensor:
    """The rows, among all the examples' sequences in order, of the sequences of examples `index`."""
    starts = torch.tensor([0] + [len(e.sequences) for e in examples]).cumsum(0)
    return torch.cat([torch.arange(starts[i], starts[i + 1]) for i in index])


def labeler_table(scores: torch.Tensor, examples: list[Example], heads: LabelerHeads, disagreements: int = 5) -> dict[str, dict]:
    """Per labeler of the held-out examples: accuracy on their own labels of the pooled score and
    of theirs, and the comparisons where the two disagree most (measured disagreement with the
    pool). `scores` are the (N, C) raw columns of the examples' sequences, in order."""
    table = {}
    for name in sorted({e.labeler for e in examples if e.labeler is not None}):
        index = [i for i, e in enumerate(examples) if e.labeler == name]
        mine = [examples[i] for i in index]
        rows = sequence_rows(examples, index)
        pooled, group = pair_margins(scores[rows, 0], mine)
        if len(pooled) == 0:
            continue
        entry = {"held_out": len(mine), "pairs": len(pooled), "pooled_accuracy": accuracy(pooled)}
        if name in heads.columns:
            own, _ = pair_margins(heads.own(scores[rows], name), mine)
            split = ((own > 0) != (pooled > 0)).nonzero().flatten()
            worst, seen = [], set()  # the largest split of each comparison, largest first
            for k in split[(own[split] - pooled[split]).abs().argsort(descending=True)].tolist():
                if group[k].item() not in seen and len(worst) < disagreements:
                    seen.add(group[k].item())
                    worst.append(k)
            entry.update({
                "train_labels": heads.labels[name], "weight": heads.weight(name), "own_accuracy": accuracy(own),
                "disagreements": [{"source": mine[group[k]].source, "pooled_margin": pooled[k].item(), "own_margin": own[k].item()} for k in worst],
            })
        table[name] = entry
    return table


def reference_completions(config: NormalizeConfig, records: list, device, seed: int, chat_template: str) -> tuple[list[Content], list[Content]]:
    """(prompts, completions) whose scores define the zero of the reward (checklist item 7)."""
    rng = random.Random(seed)
    if config.policy:
        tokenizer = load_tokenizer(config.policy)
        use_chat_template(tokenizer, chat_template)
        policy = load_causal_lm(config.policy, tokenizer).to(device)
        records, _ = encode_prompts(tokenizer, load_prompts(config.prompts), context_length(policy.config) - config.sampling.max_new_tokens, skip_invalid=False)
        prompts = [rng.choice(records).prompt for _ in range(config.num_samples)]
        completions = sample_texts(policy, tokenizer, prompts, config.sampling, desc="reference samples")
        return prompts, completions
    pairs = [(r.prompt, c) for r in records for c in (r.completions if isinstance(r, Comparison) else [r.completion])]
    pairs = rng.sample(pairs, min(config.num_samples, len(pairs)))
    return [p for p, _ in pairs], [c for _, c in pairs]


def check_config(config: RewardConfig, num_processes: int) -> None:
    """What the recipe alone decides: ranges, required keys, sizes that divide."""
    check_ranges(config, "reward")
    if not config.model:
        raise ConfigError("reward.model is required: a local path or a hub id (usually the SFT model)")
    if not config.data.train:
        raise ConfigError("reward.data.train is required: one or more feedback files")
    training.micro_batches_per_step(config.optim, num_processes, "reward.optim")
    if config.normalize.policy and not config.normalize.prompts:
        raise ConfigError("reward.normalize.prompts is required with reward.normalize.policy")


def validate(config: RewardConfig, num_processes: int) -> None:
    """What can be checked before loading data or a model: the recipe, the models' paths, and
    room for the reference samples in the normalising policy's context."""
    check_config(config, num_processes)
    check_model_path("reward.model", config.model)
    check_chat_template(config.chat_template, "reward.chat_template")
    normalize = config.normalize
    if normalize.policy:
        check_model_path("reward.normalize.policy", normalize.policy)
        check_generation_room("reward.normalize.sampling.max_new_tokens", normalize.policy, normalize.sampling.max_new_tokens)


def train(config: RewardConfig) -> Path:
    """Train a reward model on feedback; returns the path of the saved model."""
    accelerator = training.make_accelerator()
    validate(config, accelerator.num_processes)
    device, bf16 = accelerator.device, training.use_bf16(config.precision, accelerator.device)
    torch.manual_seed(config.seed)
    out = Path(config.output_dir)
    checkpoint = training.latest_checkpoint(out) if config.resume else None

    records = load_feedback(config.data.train, config.data.skip_invalid)
    eval_records = load_feedback(config.data.eval, config.data.skip_invalid) if config.data.eval else None
    if len({isinstance(r, Rating) for r in records + (eval_records or [])}) > 1:
        raise DataError(", ".join(config.data.train + config.data.eval), "mixes ratings with pairs/rankings; train them in separate runs")
    tokenizer = load_tokenizer(config.model)
    use_chat_template(tokenizer, config.chat_template)
    max_length = min(config.data.max_length, context_length(AutoConfig.from_pretrained(config.model)))
    encode = lambda record: encode_feedback(tokenizer, record, max_length)  # noqa: E731
    examples = keep_valid(records, encode, config.data.skip_invalid, "records that do not fit the model")
    if eval_records is not None:
        held_out = keep_valid(eval_records, encode, config.data.skip_invalid, "held-out records that do not fit the model")
    else:
        order = torch.randperm(len(examples), generator=torch.Generator().manual_seed(config.seed)).tolist()
        n_eval = max(1, int(len(examples) * config.data.eval_fraction))
        held_out, examples = [examples[i] for i in order[:n_eval]], [examples[i] for i in order[n_eval:]]
    heads = LabelerHeads.of(examples, config.personal) if config.personal.enabled else None
    if heads is not None and checkpoint is None and trained_outputs(config.model):
        raise ConfigError(f"reward.model: {config.model} is a trained reward model; a personal one starts from a language model (the SFT model), so that each labeler's column is its own")
    if heads is not None and not heads.columns:
        raise DataError(", ".join(config.data.train), f"reward.personal.enabled: no labeler has {config.personal.min_labels} or more labels (the records' `labeler` field)")
    load = lambda name: personal_head(load_sequence_classifier(name, tokenizer, num_labels=1 + len(heads.columns) if heads else 1), heads)  # noqa: E731
    model = training.build_trainable(load, config.model, config.lora, "SEQ_CLS", checkpoint, config.gradient_checkpointing)
    if config.disable_dropout:
        dropout_off(model)
    ratings = examples[0].label is not None
    binary = ratings and all(e.label in (0.0, 1.0) for e in examples)
    if ratings and not binary:  # regress standardised scores; the fitted bias re-centres afterwards
        labels = torch.tensor([e.label for e in examples])
        mean, std = labels.mean().item(), labels.std().clamp(min=1e-6).item()
        for e in examples + held_out:
            e.label = (e.label - mean) / std

    pad_id, n_global = tokenizer.pad_token_id, config.optim.batch_size

    def objective(scores: torch.Tensor, micro: list[Example]) -> torch.Tensor:
        if ratings:
            return rating_loss(scores, torch.tensor([e.label for e in micro], device=device), binary, n_global)
        return comparison_loss(scores, micro, n_global)

    def loss(model, micro: list[Example], whole: list[Example]) -> torch.Tensor:
        """This micro-batch's share of the mean loss over the global batch."""
        scores = forward_scores(model, [s for e in micro for s in e.sequences], pad_id, device)
        total = objective(scores[:, 0], micro)
        if heads is not None:
            total = total + personal_loss(scores, micro, heads, objective, config.personal.penalty, n_global)
        return total

    if accelerator.is_main_process:
        kind = "binary ratings" if binary else "scalar ratings" if ratings else "comparisons"
        log.info("reward: %d train / %d held-out %s, bf16=%s, lora=%s", len(examples), len(held_out), kind, bf16, config.lora.enabled)
    model, result = training.run_steps(
        "reward", config, model, tokenizer, accelerator, examples, loss,
        lambda model: evaluate(model, held_out, pad_id, config.optim.micro_batch_size, device, bf16), checkpoint, bf16,
        size=lambda example: sum(len(s) for s in example.sequences), throughput=("examples", len),
    )
    path = out / "model"
    if accelerator.is_main_process:
        model = accelerator.unwrap_model(model)
        columns = reference_columns(SequenceClassifierScore(model, tokenizer), config.normalize, records, device, config.seed, config.chat_template)
        bias, gain = fit_normalization(columns[:, 0], config.normalize.scale)
        # The scores the held-out accuracy was measured on, normalised: a policy scored far above
        # them is judged where the model was never tested (`rlhf.diagnostics`).
        held_out_columns = example_scores(model, held_out, pad_id, config.optim.micro_batch_size, device, bf16)
        held_out_scores = gain * (held_out_columns[:, 0] + bias)
        band = torch.quantile(held_out_scores, torch.tensor([0.05, 0.95])).tolist()
        stored = {"reward_bias": bias, "reward_gain": gain, "reward_score_band": band}
        if heads is not None:
            labelers = heads.stored()
            for name, entry in labelers.items():
                entry["bias"], entry["gain"] = fit_normalization(heads.own(columns, name), config.normalize.scale)
                own = entry["gain"] * (heads.own(held_out_columns, name) + entry["bias"])
                entry["score_band"] = torch.quantile(own, torch.tensor([0.05, 0.95])).tolist()
            stored.update({"reward_labelers": labelers, "reward_prior_labels": heads.prior_labels})
            result["labelers"] = labeler_table(held_out_columns, held_out, heads)
            log_labeler_table(result["labelers"])
        save_model(model, tokenizer, path, stored)
        result.update({"reward_bias": bias, "reward_gain": gain, "score_band": band})
        (out / "eval.json").write_text(json.dumps(result, indent=2) + "\n")
        log.info("reward: held-out accuracy %.3f, margin %.3f; bias %.3f gain %.3f; held-out scores %.2f to %.2f (5th to 95th percentile); saved %s",
                 result["accuracy"], result["margin"], bias, gain, *band, path)
    accelerator.wait_for_everyone()
    return path


def reference_columns(
    raw_score: SequenceClassifierScore, config: NormalizeConfig, records: list, device, seed: int, chat_template: str
) -> torch.Tensor:
    """(N, C) raw scores of the reference completions."""
    prompts, completions = reference_completions(config, records, device, seed, chat_template)
    return raw_score.columns(prompts, completions)


def fit_normalization(raw: torch.Tensor, scale: bool) -> tuple[float, float]:
    """The bias (and gain) that give reference completions' raw scores a mean of 0 (and std 1)."""
    bias = -raw.mean().item()
    gain = 1.0 / raw.std().clamp(min=1e-6).item() if scale and len(raw) > 1 else 1.0
    return bias, gain


def personal_head(model, heads: LabelerHeads | None):
    """A new head's labeler columns start at zero: every labeler starts from the pooled score."""
    head = score_head(model)
    fresh = not any("ForSequenceClassification" in a for a in model.config.architectures or [])
    if heads is not None and fresh:  # not a checkpoint being resumed
        with torch.no_grad():  # the pooled column keeps transformers' initialisation of the head
            head.weight[1:].zero_()
            if head.bias is not None:
                head.bias[1:].zero_()
    return model


def personal_loss(scores: torch.Tensor, micro: list[Example], heads: LabelerHeads, objective, penalty: float, n_global: int) -> torch.Tensor:
    """The loss of each labeler's own score s0 + d_j on their labels, plus `penalty` times the
    mean squared departure d_j; shares of the mean over the global batch of `n_global`."""
    total = scores.new_zeros(())
    for name, column in heads.columns.items():
        index = [i for i, e in enumerate(micro) if e.labeler == name]
        if not index:
            continue
        rows = sequence_rows(micro, index).to(scores.device)
        departure = scores[rows, column]
        size = torch.tensor([len(micro[i].sequences) for i in index for _ in micro[i].sequences], device=scores.device)
        total = total + objective(scores[rows, 0] + departure, [micro[i] for i in index])
        total = total + penalty * (departure.pow(2) / size).sum() / n_global
    return total


def log_labeler_table(table: dict[str, dict]) -> None:
    log.info("reward: held-out accuracy on each labeler's own labels, pooled score against theirs")
    for name, entry in table.items():
        own = f"{entry['own_accuracy']:.3f} ({entry['train_labels']} labels, weight {entry['weight']:.2f})" if "own_accuracy" in entry else "no score of their own"
        log.info("  %-16s pooled %.3f  own %s  on %d held-out pairs", name, entry["pooled_accuracy"], own, entry["pairs"])
