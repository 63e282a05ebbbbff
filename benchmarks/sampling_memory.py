"""The sampler's peak memory against the rollout batch, whole or a few prompts at a time (`generation.batch_size`).

    python benchmarks/sampling_memory.py [--batches 64 256 512] [--micro 64] [--archs gpt2 llama]

Each (architecture, rollout batch, micro-batch) samples in a fresh Python process: a random-init
4-layer, 256-wide model with a 3,000-token vocabulary (`rlhf bench`'s shape), prompts of 16
tokens, 64 new tokens at temperature 1 (a random model seldom says EOS, so every row runs to the
end: the most memory). It prints the peak resident memory the sampling added (the process's peak
after sampling less its resident memory before) and the tokens per second.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

CHILD = r"""
import json, resource, sys, time
import torch
from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig
sys.path.insert(0, {root!r})
from rlhf.sampling import SamplingConfig, sample_with_logprobs

arch, batch, micro = {arch!r}, {batch}, {micro}
torch.manual_seed(0)
if arch == "gpt2":
    config = GPT2Config(vocab_size=3000, n_positions=128, n_embd=256, n_layer=4, n_head=4, bos_token_id=0, eos_token_id=0)
else:
    config = LlamaConfig(vocab_size=3000, hidden_size=256, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=4,
                         num_key_value_heads=4, max_position_embeddings=128, bos_token_id=0, eos_token_id=0, pad_token_id=1)
model = AutoModelForCausalLM.from_config(config).eval()
prompts = torch.randint(2, 3000, (batch, 16), generator=torch.Generator().manual_seed(1)).tolist()
settings = SamplingConfig(temperature=1.0, max_new_tokens=64, batch_size=micro)
sample_with_logprobs(model, prompts[:8], 1, [0], settings)  # warm up
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
start = time.perf_counter()
samples = sample_with_logprobs(model, prompts, 1, [0], settings, torch.Generator().manual_seed(2))
seconds = time.perf_counter() - start
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
tokens = int((samples.responses != 1).sum())
print(json.dumps({{"added_mb": (peak - before) / 1024, "tokens_per_s": tokens / seconds}}))
"""


def run(arch: str, batch: int, micro: int) -> dict:
    code = CHILD.format(root=str(ROOT), arch=arch, batch=batch, micro=micro)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, nargs="+", default=[64, 256, 512])
    parser.add_argument("--micro", type=int, default=64, help="prompts at a time in the micro-batched runs")
    parser.add_argument("--archs", nargs="+", default=["gpt2", "llama"])
    args = parser.parse_args()
    print("| architecture | rollout batch | prompts at a time | memory added by sampling, MB | tokens/s |")
    print("|---|---|---|---|---|")
    for arch in args.archs:
        for batch in args.batches:
            for micro in (0, args.micro):
                r = run(arch, batch, micro)
                print(f"| {arch} | {batch} | {micro or batch} | {r['added_mb']:.0f} | {r['tokens_per_s']:,.0f} |", flush=True)


if __name__ == "__main__":
    main()
