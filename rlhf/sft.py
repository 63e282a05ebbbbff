"""Supervised fine-tuning on demonstrations: the loss on completion tokens only, EOS trained.

    rlhf sft --config recipes/demo.yaml sft.optim.lr=3e-4

Writes `output_dir/model` (loads with plain `AutoModelForCausalLM`), checkpoints under
`output_dir/checkpoints`, `metrics.jsonl` and TensorBoard events.
"""

from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
import yaml
from tqdm.auto import tqdm

from rlhf.config import ConfigError, to_dict
from rlhf.data import load_demonstrations
from rlhf.encoding import FALLBACK_CHAT_TEMPLATE, IGNORE, encode_demonstration, pad
from rlhf.models import LoraConfig, context_length, load_causal_lm, load_tokenizer, save_model
from rlhf.tracking import Tracker
from rlhf import training
from rlhf.training import OptimConfig, Precision

log = logging.getLogger(__name__)

@dataclass
class SFTData:
    train: list[str] = field(default_factory=list)
    """Demonstration files or hub datasets ({prompt, completion} or {messages})."""
    eval: list[str] = field(default_factory=list)
    """Held-out demonstrations; empty: hold out `eval_fraction` of `train`."""
    eval_fraction: float = 0.05
    """Share of `train` held out for the eval loss when `eval` is empty."""
    max_length: int = 512
    """Longest prompt + completion in tokens (capped by the model's context)."""
    skip_invalid: bool = False
    """Skip malformed records (and report how many) instead of stopping at the first."""


@dataclass
class SFTConfig:
    model: str = ""
    """Base model: a local path or a hub id."""
    output_dir: str = "runs/sft"
    """Where the model, checkpoints and metrics go."""
    data: SFTData = field(default_factory=SFTData)
    lora: LoraConfig = field(default_factory=LoraConfig)
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=3e-4, epochs=2))
    precision: Precision = "auto"
    """fp32, bf16 (autocast, fp32 master weights), or auto: bf16 where the hardware runs it fast."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass instead of keeping them (less memory, about a third more compute)."""
    eval_every: int = 100
    """Steps between eval-loss measurements."""
    save_every: int = 200
    """Steps between checkpoints."""
    log_every: int = 10
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
    model.eval()
    total, tokens = 0.0, 0
    for i in range(0, len(examples), batch_size):
        batch = {k: v.to(device) for k, v in collate(examples[i : i + batch_size], pad_id).items()}
        with training.autocast(device, bf16):
            total += token_loss_sum(model, batch).item()
        tokens += int((batch["labels"][:, 1:] != IGNORE).sum())
    model.train()
    return total / max(tokens, 1)


def train(config: SFTConfig) -> Path:
    """Fine-tune `config.model` on the demonstrations; returns the path of the saved model."""
    if not config.model:
        raise ConfigError("sft.model is required: a local path or a hub id")
    if not config.data.train:
        raise ConfigError("sft.data.train is required: one or more demonstration files")
    accelerator = training.make_accelerator()
    device, bf16 = accelerator.device, training.use_bf16(config.precision, accelerator.device)
    torch.manual_seed(config.seed)
    out = Path(config.output_dir)
    checkpoint = training.latest_checkpoint(out) if config.resume else None

    demos = load_demonstrations(config.data.train, config.data.skip_invalid)
    eval_demos = load_demonstrations(config.data.eval, config.data.skip_invalid) if config.data.eval else None
    tokenizer = load_tokenizer(config.model)
    model = training.build_trainable(lambda name: load_causal_lm(name, tokenizer), config.model, config.lora, "CAUSAL_LM", checkpoint)
    if config.gradient_checkpointing:
        training.gradient_checkpointing(model)
    max_length = min(config.data.max_length, context_length(model.config))
    if any(d.messages is not None for d in demos) and not tokenizer.chat_template:
        tokenizer.chat_template = FALLBACK_CHAT_TEMPLATE
    examples = [encode_demonstration(tokenizer, d, max_length) for d in demos]
    if eval_demos is not None:
        held_out = [encode_demonstration(tokenizer, d, max_length) for d in eval_demos]
    else:
        examples, held_out = split(examples, config.data.eval_fraction, config.seed)

    optim = config.optim
    accumulation = training.micro_batches_per_step(optim, accelerator.num_processes)
    steps_per_epoch = len(examples) // optim.batch_size
    total_steps = optim.max_steps or optim.epochs * steps_per_epoch
    optimizer, scheduler = training.make_optimizer(model, optim, total_steps)
    model, optimizer = accelerator.prepare(model, optimizer)

    state = {"epoch": 0, "batch": 0}
    if checkpoint is not None:
        state = training.load_state(checkpoint)
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
    step = state.get("step", 0)
    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.yaml").write_text(yaml.safe_dump(to_dict(config), sort_keys=False))
        log.info("sft: %d train / %d held-out examples, %d steps, bf16=%s, lora=%s", len(examples), len(held_out), total_steps, bf16, config.lora.enabled)
    tracker = Tracker(out, enabled=accelerator.is_main_process, resume_step=step)

    model.train()
    order = training.batches(len(examples), optim.batch_size, config.seed, state["epoch"], state["batch"])
    bar = tqdm(total=total_steps, initial=step, desc="sft", disable=not accelerator.is_main_process, dynamic_ncols=True)
    started, tokens_seen = time.time(), 0
    while step < total_steps:
        epoch, index, indices = next(order)
        batch_examples = [examples[i] for i in indices]
        step_tokens = sum(sum(1 for t in labels[1:] if t != IGNORE) for _, labels in batch_examples)
        local = training.shard(batch_examples, accelerator.process_index, accelerator.num_processes)
        micro = len(local) // accumulation
        loss_sum = 0.0
        for m in range(accumulation):
            batch = {k: v.to(device) for k, v in collate(local[m * micro : (m + 1) * micro], tokenizer.pad_token_id).items()}
            # DDP averages gradients over processes; scaling by their number makes the update
            # the gradient of the mean token loss over the whole global batch.
            sync = accelerator.no_sync(model) if m < accumulation - 1 else contextlib.nullcontext()
            with sync, training.autocast(device, bf16):
                loss = token_loss_sum(model, batch) / step_tokens
                accelerator.backward(loss * accelerator.num_processes)
            loss_sum += loss.item()
        grad_norm = accelerator.clip_grad_norm_(model.parameters(), optim.grad_clip) if optim.grad_clip else torch.tensor(0.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        tokens_seen += step_tokens
        loss_value = accelerator.reduce(torch.tensor(loss_sum, device=device), "sum").item()
        bar.update(1)
        bar.set_postfix(loss=f"{loss_value:.3f}")
        metrics = {}
        if step % config.log_every == 0 or step == total_steps:
            metrics.update({"train/loss": loss_value, "train/lr": scheduler.get_last_lr()[0], "train/grad_norm": float(grad_norm), **training.peak_memory(), "train/tokens_per_s": tokens_seen / (time.time() - started)})
        if step % config.eval_every == 0 or step == total_steps:
            metrics["eval/loss"] = eval_loss(model, held_out, tokenizer.pad_token_id, optim.micro_batch_size, device, bf16)
            bar.write(f"step {step}: eval loss {metrics['eval/loss']:.4f}")
        if metrics:
            tracker.log(step, metrics)
        if (step % config.save_every == 0 or step == total_steps) and accelerator.is_main_process:
            position = {"epoch": epoch, "batch": index + 1}
            training.save_checkpoint(out, step, accelerator.unwrap_model(model), tokenizer, {**position, "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()})
    bar.close()
    tracker.close()
    path = out / "model"
    if accelerator.is_main_process:
        save_model(accelerator.unwrap_model(model), tokenizer, path)
        log.info("sft: saved %s", path)
    accelerator.wait_for_everyone()
    return path
