"""Rollouts on a GPU: vLLM against the project's sampler and transformers' `generate`, and a PPO
iteration on each engine, on a random-init model of Qwen2.5-0.5B's shape (no download).

    python benchmarks/vllm_rollout.py                       # on a CUDA machine with `pip install 'rlhf[vllm]'`
    python benchmarks/vllm_rollout.py --shape tiny --engines local generate   # the harness on a CPU

For each engine it samples `--batch` prompts of up to 32 tokens, `--new-tokens` new tokens each
at temperature 1 (a random model seldom ends early), median of `--iterations` after one warm-up,
and prints generated tokens per second. Then `ppo.train` runs `--ppo-steps` steps on each of
the local and vllm engines (a length reward, a separate value network, bf16), and the script
prints the median seconds per step by phase, the mismatch the trainer logged, and the GPU
memory in use after the run (device-wide, vLLM's pool included).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch
import transformers

SHAPES = {
    # Qwen2.5-0.5B's config: 24 layers, 896 wide, 14 query and 2 key-value heads, tied embeddings.
    "qwen2.5-0.5b": dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2, vocab_size=151936),
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, vocab_size=4096),
}


def build(shape: str, root: Path) -> Path:
    """A random Qwen2 of `shape` with a small byte-level tokenizer (its ids are a subset of the vocabulary)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    texts = [f"User: question {i} about the order, the refund and the delivery.\nAssistant: answer {i}." for i in range(200)]
    bpe.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=1000, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|endoftext|>", pad_token="<|endoftext|>")
    torch.manual_seed(0)
    config = transformers.Qwen2Config(**SHAPES[shape], max_position_embeddings=4096, tie_word_embeddings=True, eos_token_id=0, pad_token_id=0, dtype="bfloat16")
    path = root / "policy"
    transformers.Qwen2ForCausalLM(config).to(torch.bfloat16).save_pretrained(path)
    tokenizer.save_pretrained(path)
    (root / "prompts.jsonl").write_text("".join(json.dumps({"prompt": text.split("Assistant:")[0] + "Assistant:"}) + "\n" for text in texts))
    return path


def prompt_ids(tokenizer, batch: int) -> list[list[int]]:
    generator = torch.Generator().manual_seed(0)
    lengths = torch.randint(8, 33, (batch,), generator=generator).tolist()
    return [torch.randint(1, len(tokenizer), (n,), generator=generator).tolist() for n in lengths]


def tokens_per_second(engine: str, path: Path, batch: int, new_tokens: int, iterations: int) -> float:
    from rlhf.models import load_causal_lm, load_tokenizer
    from rlhf.sampling import SamplingConfig, response_mask, sample_with_logprobs

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    tokenizer = load_tokenizer(str(path))
    prompts = prompt_ids(tokenizer, batch)
    sampling = SamplingConfig(temperature=1.0, max_new_tokens=new_tokens)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    policy = load_causal_lm(str(path), tokenizer, dtype=dtype).to(device).eval()
    stops = [tokenizer.eos_token_id]
    if engine == "vllm":
        from rlhf.vllm_engine import VLLMEngine

        vllm = VLLMEngine(str(path), policy, tokenizer.pad_token_id, stops, sampling, gpu_memory_utilization=0.3, sleep=False, dtype="bfloat16", max_model_len=4096, seed=0)
        run = lambda: vllm.sample(prompts, torch.Generator().manual_seed(0)).responses  # noqa: E731
    elif engine == "local":
        run = lambda: sample_with_logprobs(policy, prompts, tokenizer.pad_token_id, stops, sampling).responses  # noqa: E731
    else:
        from rlhf.encoding import pad

        ids, mask = pad(prompts, tokenizer.pad_token_id, side="left")
        ids, mask = ids.to(device), mask.to(device)

        def run():
            out = policy.generate(input_ids=ids, attention_mask=mask, do_sample=True, temperature=1.0, top_k=0, max_new_tokens=new_tokens, pad_token_id=tokenizer.pad_token_id, eos_token_id=stops)
            return out[:, ids.shape[1] :]

    rates = []
    for i in range(iterations + 1):
        if device.type == "cuda":
            torch.cuda.synchronize()
        started = time.perf_counter()
        responses = run()
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - started
        if i:  # the first is a warm-up
            rates.append(int(response_mask(responses.cpu(), stops).sum()) / seconds)
    return statistics.median(rates)


def ppo_steps(engine: str, path: Path, root: Path, steps: int, batch: int, new_tokens: int) -> dict[str, float]:
    from rlhf import ppo, rl
    from rlhf.sampling import SamplingConfig
    from rlhf.scoring import RewardSourceConfig
    from rlhf.tracking import read_metrics

    out = root / f"ppo-{engine}"
    config = ppo.PPOConfig(
        policy=str(path), output_dir=str(out), prompts=rl.PromptData(train=[str(root / "prompts.jsonl")]),
        reward=RewardSourceConfig(kind="function", path="conftest:length_reward"),
        generation=SamplingConfig(temperature=1.0, max_new_tokens=new_tokens), rollout=rl.RolloutConfig(engine=engine),
        algo=ppo.PPOAlgoConfig(batch_size=batch, minibatch_size=batch // 4, micro_batch_size=batch // 4, epochs=1),
        stop=rl.StopConfig(max_steps=steps), precision="auto", save_every=steps + 1,
    )
    ppo.train(config)
    rows = read_metrics(out)[1:]  # the first step includes the start-up
    keys = [key for key in rows[0] if key.startswith(("time/", "rollout/", "memory/"))]
    result = {key: statistics.median(row[key] for row in rows) for key in keys}
    if torch.cuda.is_available():
        free, total = torch.cuda.mem_get_info()
        result["gpu_in_use_gb"] = (total - free) / 2**30
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=SHAPES, default="qwen2.5-0.5b")
    parser.add_argument("--engines", nargs="+", choices=["vllm", "local", "generate"], default=["vllm", "local", "generate"])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--iterations", type=int, default=3)
    parser.add_argument("--ppo-steps", type=int, default=4, help="PPO steps per engine (0: none).")
    args = parser.parse_args()
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # conftest:length_reward
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        path = build(args.shape, root)
        print(f"{args.shape}: {sum(p.numel() for p in transformers.AutoModelForCausalLM.from_pretrained(path).parameters()) / 1e6:.0f}M parameters; "
              f"{args.batch} prompts, {args.new_tokens} new tokens; torch {torch.__version__}, "
              f"{torch.cuda.get_device_name() if torch.cuda.is_available() else 'CPU'}")
        for engine in args.engines:
            print(f"  {engine:9s} {tokens_per_second(engine, path, args.batch, args.new_tokens, args.iterations):10,.0f} tokens/s", flush=True)
        if args.ppo_steps:
            for engine in [e for e in args.engines if e in ("local", "vllm")]:
                result = ppo_steps(engine, path, root, args.ppo_steps, args.batch, args.new_tokens)
                print(f"  PPO step on {engine}: " + ", ".join(f"{key} {value:.3f}" for key, value in sorted(result.items())), flush=True)


if __name__ == "__main__":
    main()
