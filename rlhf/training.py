"""What the training stages share: optimiser settings, precision, batch order, checkpoints.

Every stage runs its own loop on `accelerate` (one process, or `accelerate launch` for data
parallel). Checkpoints hold the model as `save_pretrained` writes it plus `state.pt` (optimiser,
scheduler, RNG streams, step, data position, and whatever else the stage adds), written
atomically, so a resumed run continues exactly where the interrupted one stopped.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import random
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Literal

import numpy as np
import torch
import yaml
from tqdm.auto import tqdm
from transformers import get_scheduler

from rlhf.config import ConfigError, Fraction, NonNegative, NonNegativeInt, Positive, PositiveInt, to_dict
from rlhf.models import LoraConfig, add_lora, atomic_dir
from rlhf.tracking import Tracker

log = logging.getLogger(__name__)


@dataclass
class DataConfig:
    train: list[str] = field(default_factory=list)
    """Training files or hub datasets, in the stage's record format."""
    eval: list[str] = field(default_factory=list)
    """Held-out files for evaluation; empty: hold out `eval_fraction` of `train`."""
    eval_fraction: Fraction = 0.05
    """Share of `train` held out when `eval` is empty."""
    max_length: PositiveInt = 512
    """Longest prompt + completion in tokens (capped by the model's context)."""
    skip_invalid: bool = False
    """Skip malformed records and records too long for the model (and report how many) instead of stopping at the first."""


@dataclass
class OptimConfig:
    lr: Positive = 1e-4
    """Peak learning rate (AdamW)."""
    weight_decay: NonNegative = 0.0
    """AdamW weight decay."""
    warmup_steps: NonNegativeInt = 0
    """Linear warm-up steps before the schedule."""
    schedule: Literal["constant", "linear", "cosine"] = "cosine"
    """Learning-rate schedule after warm-up."""
    grad_clip: NonNegative = 1.0
    """Global gradient-norm clipping threshold (0 turns it off)."""
    batch_size: PositiveInt = 32
    """Examples per optimiser step, over all processes."""
    micro_batch_size: PositiveInt = 32
    """Examples per forward pass on one process; gradients accumulate up to `batch_size`."""
    epochs: PositiveInt = 1
    """Passes over the training data."""
    max_steps: NonNegativeInt = 0
    """Stop after this many optimiser steps (0: run all epochs)."""


Precision = Literal["auto", "fp32", "bf16"]


def cpu_flags() -> set[str]:
    try:
        return set(Path("/proc/cpuinfo").read_text().split())
    except OSError:
        return set()


BF16_PAYS = 1.2
"""`precision: auto` takes bf16 on a CPU whose bf16 matrix products run at least this many times as fast as fp32's."""


@functools.cache
def cpu_matmul_rates(n: int = 512, repeats: int = 3) -> dict[str, float]:
    """GFLOP/s of a linear layer's product ((n x n) by (n x n)^T) on this CPU in fp32 and in
    bf16, the best of `repeats`, measured once per process (tens of milliseconds where bf16 has
    its own instructions). Where bf16 is emulated one product already shows it is slower, and
    the measurement stops there rather than wait for more."""
    generator = torch.Generator().manual_seed(0)
    x, w = torch.randn(n, n, generator=generator), torch.randn(n, n, generator=generator)
    rates = {}
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        a, b = x.to(dtype), w.to(dtype)
        best = float("inf")
        for attempt in range(repeats + 1):  # the first one warms up
            started = time.perf_counter()
            torch.nn.functional.linear(a, b)
            seconds = time.perf_counter() - started
            if attempt:
                best = min(best, seconds)
            if attempt and name == "bf16" and seconds * rates["fp32"] > 2 * 2 * n**3 / 1e9:
                break  # already under half fp32's rate: emulated
        rates[name] = 2 * n**3 / best / 1e9
    return rates


def cpu_bf16_pays() -> bool:
    """Whether bf16 autocast pays on this CPU, decided by measuring (`cpu_matmul_rates`): bf16
    matrix products at least `BF16_PAYS` times fp32's. AVX512-BF16 and AMX make them about twice
    as fast; without them torch emulates bf16, many times slower."""
    rates = cpu_matmul_rates()
    pays = rates["bf16"] >= BF16_PAYS * rates["fp32"]
    flags = sorted(cpu_flags() & {"avx2", "avx512f", "avx512_bf16", "amx_bf16"}) or ["none of avx2, avx512f, avx512_bf16, amx_bf16"]
    _log_once(f"precision auto: {'bf16' if pays else 'fp32'}; bf16 matrix products measured at {rates['bf16']:.0f} GFLOP/s against "
              f"{rates['fp32']:.0f} for fp32 ({rates['bf16'] / rates['fp32']:.2f}x; bf16 pays from {BF16_PAYS}x); CPU flags: {', '.join(flags)}")
    return pays


@functools.cache
def _log_once(message: str) -> None:
    log.info("%s", message)


def make_accelerator():
    """The `accelerate` handle of a stage. On a machine without CUDA it asks for the CPU, so that
    a multi-process launch (`accelerate launch --multi_gpu --num_processes 2`, or torchrun)
    trains data-parallel over gloo."""
    from accelerate import Accelerator

    return Accelerator(cpu=not torch.cuda.is_available())


def num_processes() -> int:
    """How many data-parallel processes this run has, before any stage starts them talking
    (torchrun and `accelerate launch` set WORLD_SIZE)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def use_bf16(precision: Precision, device: torch.device) -> bool:
    """Whether to run forward passes under bf16 autocast (weights and optimiser stay fp32).

    `auto` picks bf16 where it is fast: CUDA with bf16 support, or a CPU whose bf16 matrix
    products measure faster than fp32's at start-up (`cpu_bf16_pays`).
    """
    if precision != "auto":
        return precision == "bf16"
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return device.type == "cpu" and cpu_bf16_pays()


def autocast(device: torch.device, bf16: bool):
    if not bf16:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


def micro_batches_per_step(optim: OptimConfig, num_processes: int, key: str) -> int:
    """Gradient-accumulation steps: batch_size = micro_batch_size x processes x this; checked
    once. `key` is the section's name in errors (`sft.optim`). A micro-batch larger than a
    process's share of the batch is that share."""
    per_process, rest = divmod(optim.batch_size, num_processes)
    if rest:
        raise ConfigError(f"{key}.batch_size: must be a multiple of the {num_processes} processes, got {optim.batch_size}")
    micro = min(optim.micro_batch_size, per_process)
    if per_process % micro:
        raise ConfigError(
            f"{key}.micro_batch_size: must divide the {per_process} examples per process "
            f"({key}.batch_size={optim.batch_size} over {num_processes} process(es)), got {optim.micro_batch_size}"
        )
    return per_process // micro


def make_optimizer(model: torch.nn.Module, optim: OptimConfig, total_steps: int):
    params = [p for p in model.parameters() if p.requires_grad]
    # The fused kernel updates every tensor in one pass: on the tiny bench's 4M weights a step takes
    # 3 ms against 27 for the default per-tensor loop on the CPU (as transformers' Trainer picks it).
    fused = all(p.device.type in ("cpu", "cuda") and p.dtype == torch.float32 for p in params)
    optimizer = torch.optim.AdamW(params, lr=optim.lr, weight_decay=optim.weight_decay, fused=fused)
    scheduler = get_scheduler(optim.schedule, optimizer, num_warmup_steps=optim.warmup_steps, num_training_steps=total_steps)
    return optimizer, scheduler


def batch_order(n: int, batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    """The batches of one epoch: a permutation seeded by (seed, epoch), a partial last batch dropped."""
    generator = torch.Generator().manual_seed(seed * 100_003 + epoch)
    order = torch.randperm(n, generator=generator).tolist()
    return [order[i : i + batch_size] for i in range(0, n - batch_size + 1, batch_size)]


def shard(items: list, rank: int, world: int) -> list:
    """This process's contiguous share of a global batch."""
    per = len(items) // world
    return items[rank * per : (rank + 1) * per]


def build_trainable(
    load: Callable[[str], torch.nn.Module], name: str, lora: LoraConfig, task_type: str, checkpoint: Path | None, gradient_checkpointing: bool = False
):
    """Load `name` (or the checkpoint being resumed), add LoRA adapters when asked, and turn on
    gradient checkpointing when asked."""
    model = load(str(checkpoint / "model") if checkpoint is not None and not lora.enabled else name)
    if lora.enabled and checkpoint is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(checkpoint / "model"), is_trainable=True)
    elif lora.enabled:
        model = add_lora(model, lora, task_type)
    if gradient_checkpointing:
        enable_gradient_checkpointing(model)
    return model


def enable_gradient_checkpointing(model) -> None:
    """Recompute activations in the backward pass instead of storing them: transformers' own
    checkpointing, the non-reentrant kind, which needs no gradient on the inputs (LoRA works)."""
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # the name since transformers 5.x
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def peak_memory() -> dict[str, float]:
    """Peak resident memory of this process so far (and peak CUDA memory when on a GPU), in GiB."""
    import resource

    stats = {"memory/peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}
    if torch.cuda.is_available():
        stats["memory/peak_cuda_gb"] = torch.cuda.max_memory_allocated() / 2**30
    return stats


def rng_state() -> dict:
    """This process's global random streams: Python's, NumPy's, torch's on the CPU and on its GPU."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def rng_states(accelerator) -> list[dict]:
    """Every process's `rng_state`, in process order (call it on every process): the main
    process writes them all into a checkpoint, and each process resumes with its own."""
    from accelerate.utils import gather_object

    return gather_object([rng_state()])


def save_checkpoint(
    run_dir: str | Path, step: int, model, tokenizer, state: dict, rng: list[dict], keep: int = 2, extra: Callable[[Path], None] | None = None
) -> Path:
    """Write `run_dir/checkpoints/step-N` atomically (model, tokenizer, state.pt with every
    process's random streams `rng`, and what `extra` writes into the directory); keep the last `keep`."""
    root = Path(run_dir) / "checkpoints"
    path = root / f"step-{step:07d}"
    with atomic_dir(path) as tmp:
        model.save_pretrained(tmp / "model")
        tokenizer.save_pretrained(tmp / "model")
        torch.save({**state, "step": step, "rng": rng}, tmp / "state.pt")
        if extra is not None:
            extra(tmp)
    for old in sorted(root.glob("step-*"))[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return path


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    checkpoints = sorted((Path(run_dir) / "checkpoints").glob("step-*"))
    return checkpoints[-1] if checkpoints else None


def load_state(checkpoint: Path, process_index: int = 0) -> dict:
    """The state saved with a checkpoint; this process's RNG streams are restored as a side effect."""
    state = torch.load(checkpoint / "state.pt", weights_only=False)
    set_rng_state(state["rng"][process_index])
    log.info("resuming from %s (step %d)", checkpoint, state["step"])
    return state


def run_steps(
    stage: str,
    config,
    model,
    tokenizer,
    accelerator,
    examples: list,
    loss: Callable[[torch.nn.Module, list, list], torch.Tensor],
    evaluate: Callable[[torch.nn.Module], dict[str, float]],
    checkpoint: Path | None,
    bf16: bool,
    size: Callable[[object], int],
    throughput: tuple[str, Callable[[list], int]],
):
    """The optimiser loop SFT, reward and DPO training share; returns the prepared model and the
    held-out metrics of the last step.

    Each step takes the next global batch of `config.optim.batch_size` examples in a seeded,
    resumable order. A process takes its share, sorted by `size` so that micro-batches of
    similar lengths carry little padding, and accumulates `loss(model, micro_batch, global_batch)`
    over its micro-batches: that loss must be this micro-batch's share of the mean over the
    global batch, so that the update does not depend on how the batch is split. `loss` may also
    return `(loss, stats)`, a dict of this micro-batch's shares of other per-step means (DPO's
    implicit rewards), summed like the loss and logged under their own names. `evaluate(model)`
    runs in eval mode and returns held-out metrics. Then it clips,
    steps, and logs, evaluates and checkpoints on the stage's schedule. `throughput` names what
    the speed metric counts and counts it in a global batch, e.g. ("tokens", count_tokens).
    """
    optim, out, device = config.optim, Path(config.output_dir), accelerator.device
    accumulation = micro_batches_per_step(optim, accelerator.num_processes, f"{stage}.optim")
    total_steps = optim.max_steps or optim.epochs * (len(examples) // optim.batch_size)
    if total_steps == 0:
        raise ConfigError(f"{stage}.optim.batch_size: {len(examples)} training examples do not make one batch of {optim.batch_size}")
    optimizer, scheduler = make_optimizer(model, optim, total_steps)
    model, optimizer = accelerator.prepare(model, optimizer)
    state = {"epoch": 0, "batch": 0}
    if checkpoint is not None:
        state = load_state(checkpoint, accelerator.process_index)
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
    step = state.get("step", 0)
    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.yaml").write_text(yaml.safe_dump(to_dict(config), sort_keys=False))
    tracker = Tracker(out, enabled=accelerator.is_main_process, resume_step=step)

    model.train()
    order = batches(len(examples), optim.batch_size, config.seed, state["epoch"], state["batch"])
    bar = tqdm(total=total_steps, initial=step, desc=stage, disable=not accelerator.is_main_process, dynamic_ncols=True)
    started, seen, result = time.time(), 0, {}
    while step < total_steps:
        epoch, index, indices = next(order)
        whole = [examples[i] for i in indices]
        local = sorted(shard(whole, accelerator.process_index, accelerator.num_processes), key=size)
        micro = len(local) // accumulation
        loss_sum, stats_sum = 0.0, {}
        for m in range(accumulation):
            # DDP averages gradients over processes: scaling by their number keeps the update
            # the gradient of the mean over the whole global batch.
            with accelerator.no_sync(model) if m < accumulation - 1 else contextlib.nullcontext():
                with autocast(device, bf16):
                    value = loss(model, local[m * micro : (m + 1) * micro], whole)
                value, stats = value if isinstance(value, tuple) else (value, {})
                accelerator.backward(value * accelerator.num_processes)
            loss_sum += value.item()
            for key, share in stats.items():
                stats_sum[key] = stats_sum.get(key, 0.0) + float(share)
        grad_norm = accelerator.clip_grad_norm_(model.parameters(), optim.grad_clip) if optim.grad_clip else torch.tensor(0.0)
        lr = optimizer.param_groups[0]["lr"]  # the rate this step uses; the scheduler moves on below
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        seen += throughput[1](whole)
        loss_value = accelerator.reduce(torch.tensor(loss_sum, device=device), "sum").item()
        bar.update(1)
        bar.set_postfix(loss=f"{loss_value:.3f}")
        metrics = {}
        if step % config.log_every == 0 or step == total_steps:
            metrics.update({"train/loss": loss_value, "train/lr": lr, "train/grad_norm": float(grad_norm)})
            metrics.update({f"train/{throughput[0]}_per_s": seen / (time.time() - started), **peak_memory()})
            if stats_sum:
                totals = accelerator.reduce(torch.tensor(list(stats_sum.values()), device=device), "sum")
                metrics.update(zip(stats_sum, totals.tolist()))
        if step % config.eval_every == 0 or step == total_steps:
            model.eval()
            with torch.no_grad():
                result = evaluate(model)
            model.train()
            metrics.update({f"eval/{k}": v for k, v in result.items()})
            bar.write(f"step {step}: " + ", ".join(f"held-out {k} {v:.4f}" for k, v in result.items()))
        if metrics:
            tracker.log(step, metrics)
        if step % config.save_every == 0 or step == total_steps:
            rng = rng_states(accelerator)
            if accelerator.is_main_process:
                position = {"epoch": epoch, "batch": index + 1, "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}
                save_checkpoint(out, step, accelerator.unwrap_model(model), tokenizer, position, rng)
    bar.close()
    tracker.close()
    return model, {**result, "steps": step}


def batches(n: int, batch_size: int, seed: int, start_epoch: int = 0, start_batch: int = 0) -> Iterator[tuple[int, int, list[int]]]:
    """(epoch, batch index, indices) forever, starting at a saved data position."""
    epoch, index = start_epoch, start_batch
    while True:
        order = batch_order(n, batch_size, seed, epoch)
        if not order:
            raise ConfigError(f"{n} examples are fewer than one batch of {batch_size}")
        for i in range(index, len(order)):
            yield epoch, i, order[i]
        epoch, index = epoch + 1, 0


def save_trained(out: Path, step: int, model, tokenizer, state: dict, rng: list[dict]) -> Path:
    """An RL checkpoint of a `PolicyAndValue`: the policy (or its adapters) as `model/`, plus the
    value network as `value/` or the value head as `value_head.pt` where there is a critic."""
    def save_critic(tmp: Path) -> None:  # inside the atomic directory: a kill leaves no checkpoint without it
        if model.value_head is not None:
            torch.save(model.value_head.state_dict(), tmp / "value_head.pt")
        elif model.value_model is not None:
            model.value_model.save_pretrained(tmp / "value")

    return save_checkpoint(out, step, model.policy, tokenizer, state, rng, extra=save_critic)


def load_trained(model, checkpoint: Path) -> None:
    """Load the trained weights of an RL checkpoint into a freshly built `PolicyAndValue`."""
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
    elif model.value_model is not None:
        load_into(model.value_model, checkpoint / "value")
