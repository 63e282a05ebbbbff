"""Which path the sampler takes for each architecture, and how fast it samples there.

    python benchmarks/sampler_paths.py                   # every architecture, batch 16, 32 new tokens
    python benchmarks/sampler_paths.py --precision fp32 bf16   # the sampler in fp32 and under bf16 autocast, in turn
    python benchmarks/sampler_paths.py --arch Llama Qwen2 --batch 64 --new-tokens 128

Each model is randomly initialised (4 layers, 256 wide, a 4,096-word vocabulary: the size of
`rlhf bench --size tiny`), built here with a fixed seed (no hub) and set up as the stages load a
model (`models.fused_activations`, `causal_lm.fp32_attention_on_cpu`). For each it prints the path the
sampler logged, the sampler's tokens per second (median of --iterations after one warm-up), the
same batch through the `generate` fallback (`sampling.generate_with_hf`, what a model the
sampler cannot drive gets), and plain `model.generate` with its own KV cache for reference.
Tokens are the response tokens up to and including each stop token. `--precision bf16` runs the
sampler under bf16 autocast, as the rollout engine samples when the training passes run in bf16;
given several precisions, the sampler runs in each in turn (A B A B), and the fallback and
`generate` in the first.
OpenMP threads wait passively, as `rlhf` sets them (rlhf is imported before torch).
"""

from __future__ import annotations

import argparse
import logging
import statistics
import time

import rlhf  # noqa: F401  (sets OpenMP's waiting before torch loads)
import torch
import transformers

from rlhf import causal_lm, sampling, training
from rlhf.models import fused_activations
from rlhf.encoding import pad
from rlhf.sampling import SamplingConfig, response_mask

VOCAB, STOP, PAD = 4096, 0, 1
LLAMA_LIKE = dict(intermediate_size=1024, num_key_value_heads=2)
ARCHITECTURES = {
    "GPT2": dict(n_embd=256, n_layer=4, n_head=4, n_positions=512),
    "Llama": LLAMA_LIKE,
    "Qwen2": LLAMA_LIKE,
    "Qwen3": dict(LLAMA_LIKE, head_dim=64),
    "Mistral": dict(LLAMA_LIKE, sliding_window=64),
    "Gemma2": dict(LLAMA_LIKE, head_dim=64, sliding_window=64),
    "GPTNeoX": dict(intermediate_size=1024),
    "OPT": dict(ffn_dim=1024, word_embed_proj_dim=256),
    "Phi3": LLAMA_LIKE,
}


def build(name: str):
    torch.manual_seed(0)
    common = dict(vocab_size=VOCAB, bos_token_id=2, eos_token_id=STOP, pad_token_id=PAD)
    if name != "GPT2":
        common.update(hidden_size=256, num_hidden_layers=4, num_attention_heads=4, max_position_embeddings=512)
    config = getattr(transformers, f"{name}Config")(**common, **ARCHITECTURES[name])
    model_class = transformers.GPT2LMHeadModel if name == "GPT2" else getattr(transformers, f"{name}ForCausalLM")
    model = model_class(config).eval()
    causal_lm.fp32_attention_on_cpu(model)
    return fused_activations(model)


def timed(runs: list, iterations: int) -> list[tuple[float, int]]:
    """(median seconds, response tokens of the last run) of each of `runs`, run in turn
    `iterations` times after one untimed run each."""
    for run in runs:
        run()
    times: list[list[float]] = [[] for _ in runs]
    tokens = [0] * len(runs)
    for _ in range(iterations):
        for i, run in enumerate(runs):
            torch.manual_seed(0)
            started = time.perf_counter()
            responses = run()
            times[i].append(time.perf_counter() - started)
            tokens[i] = int(response_mask(responses, [STOP]).sum())
    return [(statistics.median(t), n) for t, n in zip(times, tokens)]


@torch.no_grad()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", nargs="+", default=list(ARCHITECTURES), choices=list(ARCHITECTURES))
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--prompt-tokens", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--iterations", type=int, default=5)
    parser.add_argument("--precision", nargs="+", choices=["fp32", "bf16"], default=["fp32"])
    args = parser.parse_args()
    transformers.logging.set_verbosity_error()
    paths: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: paths.append(record.getMessage())
    logging.getLogger("rlhf.sampling").addHandler(handler)
    logging.getLogger("rlhf.sampling").setLevel(logging.INFO)

    generator = torch.Generator().manual_seed(1)
    lengths = torch.randint(args.prompt_tokens // 2, args.prompt_tokens + 1, (args.batch,), generator=generator).tolist()
    prompts = [torch.randint(3, VOCAB, (n,), generator=generator).tolist() for n in lengths]
    config = SamplingConfig(temperature=0.7, max_new_tokens=args.new_tokens)
    ids, mask = pad(prompts, PAD, side="left")
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, {torch.get_num_threads()} threads, "
          f"batch {args.batch}, prompts of up to {args.prompt_tokens} tokens, {args.new_tokens} new tokens, temperature 0.7")
    first = args.precision[0]
    autocast = lambda precision: training.autocast(torch.device("cpu"), precision == "bf16")  # noqa: E731
    sampler_columns = " ".join(f"{'sampler ' + p + ' tok/s':>19}" for p in args.precision)
    print(f"{'architecture':<14} {sampler_columns} {'fallback ' + first + ' tok/s':>20} {'generate ' + first + ' tok/s':>20}  path")
    for name in args.arch:
        model = build(name)
        def sampler(precision: str):
            def run():
                with autocast(precision):
                    return sampling.sample(model, prompts, PAD, [STOP], config)[0]
            return run

        own = timed([sampler(p) for p in args.precision], args.iterations)
        with autocast(first):
            [(fallback, fallback_tokens)] = timed([lambda: sampling.generate_with_hf(model, ids, mask, PAD, [STOP], config, None).responses], args.iterations)

        def plain_generate():
            out = model.generate(input_ids=ids, attention_mask=mask, do_sample=True, temperature=0.7, top_k=0, max_new_tokens=args.new_tokens, pad_token_id=PAD, eos_token_id=STOP)
            return sampling.truncate_at_eos(out[:, ids.shape[1] :], [STOP], PAD)[0]

        with autocast(first):
            [(reference, reference_tokens)] = timed([plain_generate], args.iterations)
        path = next((p.split(": ", 1)[1] for p in paths if p.startswith(type(model).__name__ + ":")), "?")
        samplers = " ".join(f"{n / t:>19,.0f}" for t, n in own)
        print(f"{name:<14} {samplers} {fallback_tokens / fallback:>20,.0f} {reference_tokens / reference:>20,.0f}  {path}")


if __name__ == "__main__":
    main()
