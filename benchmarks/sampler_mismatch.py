"""How far the sampler's log-probs are from the trainer's under bf16, and how fast it samples, in fp32 and under autocast.

    python benchmarks/sampler_mismatch.py                           # the demo's base model, 64 demo prompts
    python benchmarks/sampler_mismatch.py --model DIR --prompts FILE --batch 16 --new-tokens 32
    python benchmarks/sampler_mismatch.py --lora                    # the policy with LoRA adapters

Under `precision: bf16` the training passes run under bf16 autocast, and the rollout engine's
log-probs are not theirs: the trainer computes its own and measures the mismatch
(`rollout.importance_weights`). This script samples the same prompts with the project's sampler
in fp32 and under the trainer's autocast (what `rollout.LocalEngine` does under bf16), computes
the trainer's log-probs of each sample with a bf16-autocast forward pass, and prints, per engine,
the mean per-token k3 estimate of KL(engine || trainer), the largest |log-prob difference| and
tokens per second. The two engines run in turn, over three seeds each, twice.

Prompts are JSONL with `prompt` text (the demo's `prompts_train.jsonl` is written by
`python -m rlhf.demo.build --out DIR`); without `--prompts` the demo data is built in a temporary
directory.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import rlhf  # noqa: F401  (sets OpenMP's waiting before torch loads)
import torch

from rlhf import ops
from rlhf.models import LoraConfig, add_lora, load_causal_lm, load_tokenizer, position_ids, stop_token_ids
from rlhf.rollout import LocalEngine, generate, importance_weights
from rlhf.sampling import SamplingConfig

DEMO_MODEL = Path(__file__).resolve().parent.parent / "rlhf" / "demo" / "base_model"


def demo_prompts() -> Path:
    from rlhf.demo import build

    out = Path(tempfile.mkdtemp(prefix="rlhf-mismatch-"))
    build.build(str(out), 0)
    return out / "prompts_train.jsonl"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(DEMO_MODEL))
    parser.add_argument("--prompts", default="")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=48)
    parser.add_argument("--temperature", type=float, default=0.7)
    parser.add_argument("--lora", action="store_true", help="sample the model with LoRA adapters (r 8) on it")
    args = parser.parse_args()
    tokenizer = load_tokenizer(args.model)
    model = load_causal_lm(args.model, tokenizer).eval()
    if args.lora:
        model = add_lora(model, LoraConfig(enabled=True, r=8), "CAUSAL_LM")
    lines = Path(args.prompts or demo_prompts()).read_text().splitlines()[: args.batch]
    prompts = [tokenizer(json.loads(line)["prompt"])["input_ids"] for line in lines]
    stop_ids, pad_id = stop_token_ids(tokenizer, model), tokenizer.pad_token_id
    sampling = SamplingConfig(temperature=args.temperature, max_new_tokens=args.new_tokens)
    print(f"{args.model}{' with LoRA' if args.lora else ''}: {len(prompts)} prompts, {args.new_tokens} new tokens, temperature {args.temperature}, "
          f"{torch.get_num_threads()} threads; the trainer: a bf16-autocast forward pass")
    for _ in range(2):
        for name, bf16 in (("fp32 sampler", False), ("sampler under bf16 autocast", True)):
            engine = LocalEngine(model, pad_id, stop_ids, sampling, bf16)
            engine.trainer_logprobs = False  # keep the engine's log-probs apart, as under bf16
            kl, largest, seconds, tokens = [], 0.0, 0.0, 0
            for seed in range(3):
                started = time.perf_counter()
                batch = generate(engine, prompts, pad_id, stop_ids, torch.device("cpu"), torch.Generator().manual_seed(seed))
                seconds += time.perf_counter() - started
                tokens += int(batch.mask.sum())
                ids, attention = torch.cat([batch.query, batch.responses], 1), torch.cat([batch.query_mask, batch.mask], 1)
                with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
                    logits = model(input_ids=ids, attention_mask=attention, position_ids=position_ids(attention)).logits
                batch.logprobs = ops.logprobs_from_logits(logits[:, batch.query.shape[1] - 1 : -1], batch.responses, args.temperature)
                metrics = importance_weights(batch, 2.0)
                kl.append(metrics["rollout/mismatch_kl"])
                largest = max(largest, metrics["rollout/mismatch_max"])
            print(f"  {name:<29} mismatch KL per token {statistics.mean(kl):.2e}, largest |log-prob difference| {largest:.3f}, {tokens / seconds:,.0f} tokens/s")


if __name__ == "__main__":
    main()
