"""Supervised fine-tuning on demonstrations: the loss on completion tokens only, EOS trained.

    rlhf sft --config recipes/demo.yaml sft.optim.lr=3e-4

Writes `output_dir/model` (loads with plain `AutoModelForCausalLM`), checkpoints under
`output_dir/checkpoints`, `metrics.jsonl` and TensorBoard events.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from rlhf.config import ConfigError, PositiveInt, check_ranges
from rlhf.data import keep_valid, load_demonstrations
from rlhf.encoding import FALLBACK_CHAT_TEMPLATE, IGNORE, check_chat_template, encode_demonstration, pad, use_chat_template
from rlhf.models import LoraConfig, check_model_path, context_length, load_causal_lm, load_tokenizer, save_model
from rlhf import training
from rlhf.training import DataConfig, OptimConfig, Precision

log = logging.getLogger(__name__)

@dataclass
class SFTConfig:
    model: str = ""
    """Base model: a local path or a hub id."""
    output_dir: str = "runs/sft"
    """Where the model, checkpoints and metrics go."""
    data: DataConfig = field(default_factory=DataConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=3e-4, epochs=2))
    chat_template: str = "auto"
    """How conversations (lists of messages) become tokens: auto (the tokenizer's chat template, or plain "User: ..." / "Assistant: ..." turns when it has none), none (always those plain turns), or the path of a Jinja chat template. String prompts are used as written."""
    precision: Precision = "auto"
    """fp32, bf16 (autocast, fp32 master weights), or auto: bf16 where the hardware runs it fast."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass instead of keeping them (less memory, about a third more compute)."""
    eval_every: PositiveInt = 100
    """Steps between eval-loss measurements."""
    save_every: PositiveInt = 200
    """Steps between checkpoints."""
    log_every: PositiveInt = 10
    """Steps between metric lines."""
    resume: bool = False
    """Continue from the latest checkpoint in output_dir."""
    seed: int = 0
    """Seed for the data order, the split and initialisation."""


def collate(examples: list[tuple[list[int], list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a list of (input_ids, labels) into tensors."""
    input_ids, attention_mask = pad([ids for ids, _ in examples], pad_id)
    labels, _ = pad([labels for _, labels in examples], IGNORE)
    return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}


def token_loss_sum(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Sum of next-token cross-entropy over completion tokens (labels != IGNORE)."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    return F.cross_entropy(
        logits[:, :-1].flatten(0, 1).float(), batch["labels"][:, 1:].flatten(), ignore_index=IGNORE, reduction="sum"
    )


def split(examples: list, fraction: float, seed: int) -> tuple[list, list]:
    """Seeded split into (train, held out); at least one example held out."""
    order = torch.randperm(len(examples), generator=torch.Generator().manual_seed(seed)).tolist()
    n_eval = max(1, int(len(examples) * fraction))
    return [examples[i] for i in order[n_eval:]], [examples[i] for i in order[:n_eval]]


@torch.no_grad()
def eval_loss(model, examples, pad_id: int, batch_size: int, device, bf16: bool) -> float:
    """Mean next-token loss over the completion tokens of held-out examples."""
    total, tokens = 0.0, 0
    for i in range(0, len(examples), batch_size):
        batch = {k: v.to(device) for k, v in collate(examples[i : i + batch_size], pad_id).items()}
        with training.autocast(device, bf16):
            total += token_loss_sum(model, batch).item()
        tokens += int((batch["labels"][:, 1:] != IGNORE).sum())
    return total / max(tokens, 1)


def check_config(config: SFTConfig, num_processes: int) -> None:
    """What the recipe alone decides: ranges, required keys, sizes that divide."""
    check_ranges(config, "sft")
    if not config.model:
        raise ConfigError("sft.model is required: a local path or a hub id")
    if not config.data.train:
        raise ConfigError("sft.data.train is required: one or more demonstration files")
    training.micro_batches_per_step(config.optim, num_processes, "sft.optim")


def validate(config: SFTConfig, num_processes: int) -> None:
    """What can be checked before loading data or a model: the recipe, and the model's path."""
    check_config(config, num_processes)
    check_model_path("sft.model", config.model)
    check_chat_template(config.chat_template, "sft.chat_template")


def train(config: SFTConfig) -> Path:
    """Fine-tune `config.model` on the demonstrations; returns the path of the saved model."""
    accelerator = training.make_accelerator()
    validate(config, accelerator.num_processes)
    device, bf16 = accelerator.device, training.use_bf16(config.precision, accelerator.device)
    torch.manual_seed(config.seed)
    out = Path(config.output_dir)
    checkpoint = training.latest_checkpoint(out) if config.resume else None

    demos = load_demonstrations(config.data.train, config.data.skip_invalid)
    eval_demos = load_demonstrations(config.data.eval, config.data.skip_invalid) if config.data.eval else None
    tokenizer = load_tokenizer(config.model)
    use_chat_template(tokenizer, config.chat_template)
    load = lambda name: load_causal_lm(name, tokenizer)  # noqa: E731
    model = training.build_trainable(load, config.model, config.lora, "CAUSAL_LM", checkpoint, config.gradient_checkpointing)
    max_length = min(config.data.max_length, context_length(model.config))
    if any(d.messages is not None or isinstance(d.prompt, list) for d in demos) and not tokenizer.chat_template:
        tokenizer.chat_template = FALLBACK_CHAT_TEMPLATE  # saved with the model: what it was trained on
    encode = lambda demo: encode_demonstration(tokenizer, demo, max_length)  # noqa: E731
    examples = keep_valid(demos, encode, config.data.skip_invalid, "demonstrations that do not fit the model")
    if eval_demos is not None:
        held_out = keep_valid(eval_demos, encode, config.data.skip_invalid, "held-out demonstrations that do not fit the model")
    else:
        examples, held_out = split(examples, config.data.eval_fraction, config.seed)

    pad_id = tokenizer.pad_token_id

    def completion_tokens(batch: list) -> int:
        return sum(sum(1 for t in labels[1:] if t != IGNORE) for _, labels in batch)

    def loss(model, micro: list, whole: list) -> torch.Tensor:
        """This micro-batch's share of the mean token loss over the global batch."""
        return token_loss_sum(model, {k: v.to(device) for k, v in collate(micro, pad_id).items()}) / completion_tokens(whole)

    if accelerator.is_main_process:
        log.info("sft: %d train / %d held-out examples, bf16=%s, lora=%s", len(examples), len(held_out), bf16, config.lora.enabled)
    evaluate = lambda model: {"loss": eval_loss(model, held_out, pad_id, config.optim.micro_batch_size, device, bf16)}  # noqa: E731
    model, _ = training.run_steps(
        "sft", config, model, tokenizer, accelerator, examples, loss, evaluate, checkpoint, bf16,
        size=lambda example: len(example[0]), throughput=("tokens", completion_tokens),
    )
    path = out / "model"
    if accelerator.is_main_process:
        save_model(accelerator.unwrap_model(model), tokenizer, path)
        log.info("sft: saved %s", path)
    accelerator.wait_for_everyone()
    return path
