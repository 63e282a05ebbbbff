"""`rlhf bench`: how fast each stage runs on this machine, phase by phase, and its peak memory.

    rlhf bench                                    # tiny model, fp32, the default workload
    rlhf bench --size small --precision bf16
    rlhf bench --new-tokens 128 --batch 64        # longer responses, larger batches
    rlhf bench --stages ppo --modes full lora value-head checkpointing   # peak memory per mode
    rlhf bench --stages reward dpo                # DPO pairs/s beside the reward model's
    rlhf bench --json bench.json                  # the results as JSON in a file as well
    rlhf bench --policy DIR --reward DIR --prompts prompts.jsonl   # given models and prompts
    rlhf bench --precision auto                   # what `precision: auto` picks here, and why

The models are GPT-2-style, randomly initialised with a fixed seed and built here (no hub):
tiny is 4 layers 256 wide, small 8 layers 512 wide, both with a 4,096-word vocabulary. The
reward model, from which the value network starts, is a `GPT2ForSequenceClassification` of the
same size saved as `rlhf reward` saves one, so the reward forward pass is real. The default
workload is one PPO iteration on 16 prompts of up to 16 tokens with 32 new tokens each, one
epoch, one minibatch.

What runs is the library's own code: `rl.experience` (the rollout, whose phases time
themselves as in training, and the advantages) and `rl.update_epochs`; with one update per
iteration the update's forward pass gives the values (`rl.folds`) and there is no value phase.
For the reward model and SFT their
losses (`reward.forward_scores` and `reward.comparison_loss`, `sft.token_loss_sum`) with the
optimiser of `training.make_optimizer`. Times are medians over `--iterations` after `--warmup`.
FLOPs are counted once per phase with `torch.utils.flop_counter` (matrix products and
attention) and divided by the phase's median time; the matrix-product peak beside them is the
best of a few square `torch.mm` in fp32 and in bf16, measured at the start of the same run.
Every (stage, mode) runs in a fresh process, so the peak resident memory it reports is its own.

`--policy`, `--reward` and `--prompts` time given models (local directories, or hub ids) and
prompts instead, so that another library can be timed on exactly the same fixtures
(`benchmarks/vs_trl.py`). The prompts file is JSONL with `input_ids` (token ids, used as they
are) or `prompt` (text, tokenized by the policy's tokenizer as it stands, no chat template); the
first `--batch` are used. `--size` then only names the run.

A DPO step (`dpo.batch_loss`) trains the policy on the reward model's pairs, the same prompts and
completions, so its pairs/s stand beside the reward model's; the reference log-probs are computed
before the timed steps, once, as `rlhf dpo` does before training.
"""

from __future__ import annotations

import json
import os
import platform
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from rlhf.config import NonNegativeInt, PositiveInt

SIZES = {"tiny": (4, 256), "small": (8, 512)}  # (layers, width); heads of 64 dimensions
VOCAB = 4096
STAGES = ("ppo", "reward", "dpo", "sft")
MODES = ("full", "lora", "value-head", "checkpointing")
CHOICES = {"size": list(SIZES), "precision": ["fp32", "bf16", "auto"], "stages": list(STAGES), "modes": list(MODES)}


@dataclass
class BenchConfig:
    size: str = "tiny"
    """tiny (4 layers x 256) or small (8 layers x 512)."""
    precision: str = "fp32"
    """fp32, bf16 autocast as the stages run it, or auto: what `precision: auto` picks on this machine (reported)."""
    batch: PositiveInt = 16
    """Prompts per PPO iteration; pairs per reward-model and DPO step; sequences per SFT step."""
    prompt_tokens: PositiveInt = 16
    """Longest prompt (prompts are half as long up to this)."""
    new_tokens: PositiveInt = 32
    """Tokens sampled per response (and completion tokens in the reward, DPO and SFT batches)."""
    iterations: PositiveInt = 10
    """Timed iterations; the median is reported, with min and max."""
    warmup: NonNegativeInt = 2
    """Untimed iterations first."""
    stages: list[str] = field(default_factory=lambda: list(STAGES))
    """Which of ppo, reward, dpo, sft to run."""
    modes: list[str] = field(default_factory=lambda: ["full"])
    """Memory modes, each in its own process: full, lora, value-head (PPO only), checkpointing."""
    policy: str = ""
    """A causal LM to time instead of the built one (directory or hub id)."""
    reward: str = ""
    """A reward model (sequence classifier with one output) to time instead of the built one."""
    prompts: str = ""
    """JSONL prompts to time instead of random ones: `input_ids` or `prompt` (text) per line."""


# ---------------------------------------------------------------------------------------------
# The machine and its matrix-product peak


def machine() -> dict:
    """CPU model, the vector extensions that decide fp32/bf16 speed, cores, versions, load."""
    import transformers

    info = {"cpu": platform.processor() or platform.machine(), "flags": [], "cores": os.cpu_count()}
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text()
        info["cpu"] = next(line.split(":", 1)[1].strip() for line in cpuinfo.splitlines() if line.startswith("model name"))
        flags = set(next(line.split(":", 1)[1].split() for line in cpuinfo.splitlines() if line.startswith("flags")))
        info["flags"] = sorted(f for f in flags if f in {"avx2", "fma", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16", "amx_tile"})
    except (OSError, StopIteration):
        pass
    try:
        info["load_before"] = float(Path("/proc/loadavg").read_text().split()[0])
    except OSError:
        pass
    info.update(torch=torch.__version__, transformers=transformers.__version__, threads=torch.get_num_threads())
    return info


def matmul_rates(dtype: torch.dtype, n: int, repeats: int) -> dict[str, float]:
    """Best GFLOP/s of (n x n) matrix products in `dtype`, for each layout of the operands: a @ b,
    a.T @ b and a @ b.T of contiguous a and b. Without native bf16 instructions torch's fallback
    kernel for bf16 is far faster for some layouts than for others; fp32 runs them all alike."""
    a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
    rates = {}
    for layout, product in (("a@b", lambda: a @ b), ("a.T@b", lambda: a.T @ b), ("a@b.T", lambda: a @ b.T)):
        product()
        best = float("inf")
        for _ in range(repeats):
            started = time.perf_counter()
            product()
            best = min(best, time.perf_counter() - started)
        rates[layout] = 2 * n**3 / best / 1e9
    return rates


# ---------------------------------------------------------------------------------------------
# Models, tokenizer and data, built locally with fixed seeds


def build_models(root: Path, size: str, vocab: int = VOCAB) -> tuple[Path, Path]:
    """Save a policy (causal LM) and a reward model of `size` with a word-level tokenizer of
    `vocab` words under `root`."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import GPT2Config, GPT2ForSequenceClassification, GPT2LMHeadModel, PreTrainedTokenizerFast

    words = ["<|endoftext|>", "<|pad|>", "<unk>"] + [f"w{i}" for i in range(3, vocab)]
    word_level = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    word_level.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=word_level, eos_token="<|endoftext|>", pad_token="<|pad|>", unk_token="<unk>")
    layers, width = SIZES[size]
    config = GPT2Config(
        vocab_size=vocab, n_positions=1024, n_embd=width, n_layer=layers, n_head=width // 64,
        bos_token_id=0, eos_token_id=0, pad_token_id=1, num_labels=1,
    )
    torch.manual_seed(0)
    policy, reward = root / "policy", root / "reward"
    GPT2LMHeadModel(config).save_pretrained(policy)
    torch.manual_seed(1)
    rm = GPT2ForSequenceClassification(config)
    rm.config.reward_bias, rm.config.reward_gain = 0.0, 1.0  # as `rlhf reward` stores its normalisation
    rm.save_pretrained(reward)
    for path in (policy, reward):
        tokenizer.save_pretrained(path)
    return policy, reward


def random_prompts(n: int, max_tokens: int, seed: int = 0, words: list[int] | None = None) -> list[list[int]]:
    """`n` prompts of max_tokens/2 .. max_tokens random `words` (default: the built vocabulary
    but EOS, pad and unknown)."""
    rng = random.Random(seed)
    words = words or list(range(3, VOCAB))
    return [[rng.choice(words) for _ in range(rng.randint(max(1, max_tokens // 2), max_tokens))] for _ in range(n)]


def ordinary_ids(tokenizer) -> list[int]:
    """Token ids that are no special token: what random completions are drawn from."""
    special = set(tokenizer.all_special_ids)
    return [i for i in range(len(tokenizer)) if i not in special]


def read_prompts(path: str, tokenizer, n: int) -> list[list[int]]:
    """The first `n` prompts of a JSONL file as token ids: `input_ids` as given, `prompt` tokenized."""
    from rlhf.config import ConfigError

    prompts = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise ConfigError(f"{path}:{number}: not JSON ({error.msg})") from None
            ids = record.get("input_ids") if isinstance(record, dict) else None
            if ids is None and isinstance(record, dict) and isinstance(record.get("prompt"), str):
                ids = tokenizer(record["prompt"], add_special_tokens=False)["input_ids"]
            if not (isinstance(ids, list) and ids and all(isinstance(i, int) and 0 <= i < len(tokenizer) for i in ids)):
                raise ConfigError(f"{path}:{number}: needs input_ids (a non-empty list of token ids below {len(tokenizer)}) or prompt (text)")
            prompts.append(ids)
            if len(prompts) == n:
                return prompts
    raise ConfigError(f"--prompts {path}: {len(prompts)} prompts, fewer than --batch {n}")


def bench_prompts(bench: BenchConfig, tokenizer) -> list[list[int]]:
    """The PPO prompts: from `--prompts`, or random ones of the built vocabulary."""
    if bench.prompts:
        return read_prompts(bench.prompts, tokenizer, bench.batch)
    return random_prompts(bench.batch, bench.prompt_tokens, words=ordinary_ids(tokenizer) if bench.policy else None)


def pairs(bench: BenchConfig, tokenizer, seed: int) -> list[tuple[list[int], list[list[int]]]]:
    """(prompt, [chosen, rejected]) pairs for the reward-model and DPO steps: each prompt with two
    random completions of `new_tokens` ordinary tokens, ended by EOS."""
    rng, words = random.Random(seed), ordinary_ids(tokenizer)
    eos = tokenizer.eos_token_id
    return [(p, [p + [rng.choice(words) for _ in range(bench.new_tokens)] + [eos] for _ in range(2)]) for p in bench_prompts(bench, tokenizer)]


# ---------------------------------------------------------------------------------------------
# Counting FLOPs


def _register_cpu_attention_flops() -> None:
    """The CPU kernel of scaled_dot_product_attention has no FLOP formula in torch's counter."""
    from torch.utils import flop_counter

    aten = torch.ops.aten
    forward = getattr(aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    if forward is None or forward in flop_counter.flop_registry:
        return

    @flop_counter.register_flop_formula(forward)
    def _forward(query, key, value, *args, **kwargs) -> int:
        return flop_counter.sdpa_flop_count(query, key, value)  # shapes, as the counter passes them

    backward = getattr(aten, "_scaled_dot_product_flash_attention_for_cpu_backward", None)
    if backward is not None:

        @flop_counter.register_flop_formula(backward)
        def _backward(grad_out, query, key, value, *args, **kwargs) -> int:
            return flop_counter.sdpa_backward_flop_count(grad_out, query, key, value)


@contextmanager
def counting(flops: dict[str, float], key: str):
    """Add the FLOPs of the block to `flops[key]`."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        yield
    flops[key] = flops.get(key, 0.0) + counter.get_total_flops()


def summary(times: list[float]) -> dict[str, float]:
    return {"median": statistics.median(times), "min": min(times), "max": max(times)}


# ---------------------------------------------------------------------------------------------
# The stages, each run in its own process


def run_ppo(bench: BenchConfig, mode: str, policy: Path, reward_model: Path) -> dict:
    """Median seconds per PPO iteration and per phase, FLOPs per phase, generated tokens per second."""
    from rlhf import ppo, rl, training
    from rlhf.rollout import LocalEngine, generate, policy_forward, reference_forward, score, timed
    from rlhf.models import load_tokenizer, stop_token_ids
    from rlhf.sampling import SamplingConfig
    from rlhf.scoring import RewardSourceConfig, load_reward_source

    config = ppo.PPOConfig(
        policy=str(policy),
        reward=RewardSourceConfig(kind="model", path=str(reward_model), batch_size=bench.batch),
        generation=SamplingConfig(temperature=0.7, max_new_tokens=bench.new_tokens),
        algo=ppo.PPOAlgoConfig(batch_size=bench.batch, minibatch_size=bench.batch, micro_batch_size=bench.batch, epochs=1),
        optim=rl.OptimConfig(lr=1e-5, schedule="constant"),
        precision=bench.precision,
    )
    config.lora.enabled = mode == "lora"
    config.value.head_on_policy = mode == "value-head"
    config.gradient_checkpointing = mode == "checkpointing"
    accelerator = training.make_accelerator()
    device, bf16 = accelerator.device, training.use_bf16(config.precision, accelerator.device)
    torch.manual_seed(0)
    tokenizer = load_tokenizer(config.policy)
    model, reference = rl.build_models(config, ppo.PPO(config), tokenizer, device)
    reward_source = load_reward_source(config.reward, device)
    optimizer, scheduler = training.make_optimizer(model, config.optim, bench.warmup + bench.iterations + 1)
    model, optimizer = accelerator.prepare(model, optimizer)
    unwrapped = accelerator.unwrap_model(model)
    generator = torch.Generator().manual_seed(1)
    prompts = bench_prompts(bench, tokenizer)
    texts = tokenizer.batch_decode(prompts)
    beta = config.kl.beta

    algorithm, reduce = ppo.PPO(config), lambda t: accelerator.reduce(t, "sum")
    fold = rl.folds(config.algo, 1, accelerator.num_processes)

    def iteration() -> tuple[dict[str, float], int]:
        timings: dict[str, float] = {}
        with timed(timings, "time/iteration"):
            batch, info, first = rl.experience(model, algorithm, reference, prompts, texts, reward_source, config, tokenizer, device, bf16, beta, reduce, fold=fold)
            model.train()
            with timed(info, "time/train"):
                rl.update_epochs(model, algorithm, optimizer, scheduler, batch, config, accelerator, bf16, generator, beta, first)
        timings.update({k: v for k, v in info.items() if k.startswith("time/")})
        return timings, int(batch.mask.sum())

    for _ in range(bench.warmup):
        iteration()
    runs = [iteration() for _ in range(bench.iterations)]

    # One more iteration, phase by phase as `rl.experience` runs them, to count the FLOPs of each.
    flops: dict[str, float] = {}
    with torch.no_grad():
        unwrapped.eval()
        with counting(flops, "generate"):
            stop_ids = stop_token_ids(tokenizer, unwrapped.policy)
            engine = LocalEngine(unwrapped.policy, tokenizer.pad_token_id, stop_ids, config.generation, bf16)
            batch = generate(engine, prompts, tokenizer.pad_token_id, stop_ids, device)
        with counting(flops, "score"):
            score(batch, texts, reward_source, tokenizer, config.algo.missing_eos_penalty, config.algo.score_clip)
        if not fold:
            with counting(flops, "value"):
                policy_forward(unwrapped, batch, config.generation.temperature, config.algo.micro_batch_size, device, bf16)
        with counting(flops, "reference"):
            reference_forward(unwrapped.policy, reference, batch, config.generation.temperature, config.algo.micro_batch_size, device, bf16)
    model.train()
    with counting(flops, "train"):
        first = rl.fold_forward(model, batch, config, bf16) if fold else None
        rl.logprob_terms(batch, config)
        algorithm.advantages(batch, beta, reduce)
        rl.update_epochs(model, algorithm, optimizer, scheduler, batch, config, accelerator, bf16, generator, beta, first)

    phases = {}
    for phase in ("generate", "score", "value", "reference", "advantages", "train"):
        if phase == "value" and fold:
            continue  # the update's forward pass gives the values (rl.folds)
        seconds = summary([t[f"time/{phase}"] for t, _ in runs])
        # The reward source and the advantages run in fp32 whatever `precision` says.
        precision = "fp32" if phase in ("score", "advantages") else ("bf16" if bf16 else "fp32")
        gflop = flops.get(phase, 0.0) / 1e9
        phases[phase] = {**seconds, "gflop": gflop, "gflops": gflop / seconds["median"], "precision": precision}
    return {
        "iteration_s": summary([t["time/iteration"] for t, _ in runs]),
        "phases": phases,
        "generated_tokens": statistics.median(n for _, n in runs),
        "generated_tokens_per_s": statistics.median(n / t["time/generate"] for t, n in runs),
    }


def run_reward(bench: BenchConfig, mode: str, policy: Path, reward_model: Path) -> dict:
    """Seconds per optimiser step of the reward model on `batch` pairs of prompt + completion."""
    from rlhf import reward, training
    from rlhf.models import LoraConfig, dropout_off, load_sequence_classifier, load_tokenizer

    lora, device = LoraConfig(enabled=mode == "lora"), torch.device("cpu")
    bf16 = training.use_bf16(bench.precision, device)
    tokenizer = load_tokenizer(str(reward_model))
    torch.manual_seed(0)
    load = lambda name: load_sequence_classifier(name, tokenizer, num_labels=1)  # noqa: E731
    model = training.build_trainable(load, str(reward_model), lora, "SEQ_CLS", None, mode == "checkpointing")
    dropout_off(model)  # as `rlhf reward` trains (reward.disable_dropout) and TRL's RewardTrainer does
    optimizer, _ = training.make_optimizer(model, training.OptimConfig(lr=1e-5, schedule="constant"), 1)
    examples = [reward.Example(sequences) for _, sequences in pairs(bench, tokenizer, 2)]
    sequences = [s for e in examples for s in e.sequences]

    def loss() -> torch.Tensor:
        scores = reward.forward_scores(model, sequences, tokenizer.pad_token_id, device)[:, 0]
        return reward.comparison_loss(scores, examples, len(examples))

    return optimiser_steps(model, optimizer, loss, bench, bf16, ("pairs", len(examples)))


def run_dpo(bench: BenchConfig, mode: str, policy: Path, reward_model: Path) -> dict:
    """Seconds per DPO optimiser step on `batch` pairs, the reward model's (same prompts and
    completions), on the policy; reference log-probs precomputed, as training does (with LoRA
    the adapters-off pass)."""
    from rlhf import dpo, training
    from rlhf.models import LoraConfig, dropout_off, load_causal_lm, load_tokenizer

    lora, device = LoraConfig(enabled=mode == "lora"), torch.device("cpu")
    bf16 = training.use_bf16(bench.precision, device)
    tokenizer = load_tokenizer(str(policy))
    torch.manual_seed(0)
    load = lambda name: load_causal_lm(name, tokenizer)  # noqa: E731
    model = training.build_trainable(load, str(policy), lora, "CAUSAL_LM", None, mode == "checkpointing")
    dropout_off(model)  # as `rlhf dpo` trains
    optimizer, _ = training.make_optimizer(model, training.OptimConfig(lr=1e-5, schedule="constant"), 1)
    examples = [dpo.Example(sequences, len(p), [(0, 1)]) for p, sequences in pairs(bench, tokenizer, 2)]
    dpo.reference_logprobs(model, examples, tokenizer.pad_token_id, bench.batch, device, bf16, adapters_off=lora.enabled)
    loss = lambda: dpo.batch_loss(model, examples, tokenizer.pad_token_id, device, dpo.LossConfig(), len(examples))[0]  # noqa: E731
    result = optimiser_steps(model, optimizer, loss, bench, bf16, ("pairs", len(examples)))
    result["tokens_per_s"] = sum(len(s) for e in examples for s in e.sequences) / result["step_s"]["median"]
    return result


def run_sft(bench: BenchConfig, mode: str, policy: Path, reward_model: Path) -> dict:
    """Seconds per SFT optimiser step on `batch` sequences of prompt + completion."""
    from rlhf import sft, training
    from rlhf.encoding import IGNORE
    from rlhf.models import LoraConfig, load_causal_lm, load_tokenizer

    lora, device = LoraConfig(enabled=mode == "lora"), torch.device("cpu")
    bf16 = training.use_bf16(bench.precision, device)
    tokenizer = load_tokenizer(str(policy))
    torch.manual_seed(0)
    load = lambda name: load_causal_lm(name, tokenizer)  # noqa: E731
    model = training.build_trainable(load, str(policy), lora, "CAUSAL_LM", None, mode == "checkpointing")
    optimizer, _ = training.make_optimizer(model, training.OptimConfig(lr=1e-4, schedule="constant"), 1)
    examples = []
    for prompt, (sequence, _) in pairs(bench, tokenizer, 3):
        completion = sequence[len(prompt) + 1:]  # new_tokens, EOS last
        examples.append((prompt + completion, [IGNORE] * len(prompt) + completion))
    batch = sft.collate(examples, tokenizer.pad_token_id)
    tokens = int(batch["attention_mask"].sum())
    targets = int((batch["labels"][:, 1:] != IGNORE).sum())
    return optimiser_steps(model, optimizer, lambda: sft.token_loss_sum(model, batch) / targets, bench, bf16, ("tokens", tokens))


def optimiser_steps(model, optimizer, loss, bench: BenchConfig, bf16: bool, throughput: tuple[str, int]) -> dict:
    """Seconds, FLOPs and throughput of an optimiser step on `loss()` (a CPU model in train mode);
    `throughput` names what one step processes and how many, e.g. ("pairs", 16)."""
    from rlhf import training

    model.train()

    def step() -> None:
        with training.autocast(torch.device("cpu"), bf16):
            value = loss()
        value.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    times = timed_steps(step, bench)
    flops = {}
    with counting(flops, "step"):
        step()
    seconds = summary(times)
    unit, count = throughput
    return {"step_s": seconds, f"{unit}_per_s": count / seconds["median"], "gflop": flops["step"] / 1e9, "gflops": flops["step"] / 1e9 / seconds["median"]}


def timed_steps(step, bench: BenchConfig) -> list[float]:
    for _ in range(bench.warmup):
        step()
    times = []
    for _ in range(bench.iterations):
        started = time.perf_counter()
        step()
        times.append(time.perf_counter() - started)
    return times


RUNNERS = {"ppo": run_ppo, "reward": run_reward, "dpo": run_dpo, "sft": run_sft}


def in_fresh_process(stage: str, mode: str, bench: BenchConfig, policy: Path, reward_model: Path) -> dict:
    """Run one (stage, mode) in a new Python process, so that its peak resident memory is its own."""
    job = {"stage": stage, "mode": mode, "bench": asdict(bench), "policy": str(policy), "reward_model": str(reward_model)}
    with tempfile.TemporaryDirectory(prefix="rlhf-bench-job-") as tmp:
        out = Path(tmp) / f"{stage}-{mode}.json"
        code = "import sys, rlhf.bench; rlhf.bench.job(sys.argv[1], sys.argv[2])"
        subprocess.run([sys.executable, "-c", code, json.dumps(job), str(out)], check=True)
        return json.loads(out.read_text())


def job(spec: str, out: str) -> None:
    """The child's side of `in_fresh_process`: run the job, write its results and peak memory to `out`."""
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    _register_cpu_attention_flops()
    spec = json.loads(spec)
    rss_start = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    result = RUNNERS[spec["stage"]](BenchConfig(**spec["bench"]), spec["mode"], Path(spec["policy"]), Path(spec["reward_model"]))
    result.update(peak_rss_gb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, rss_before_models_gb=rss_start)
    Path(out).write_text(json.dumps(result))


# ---------------------------------------------------------------------------------------------
# Running and reporting


def run(bench: BenchConfig) -> dict:
    """Measure the peaks, then every requested (stage, mode) in a fresh process; returns the results."""
    from rlhf import training
    from rlhf.models import check_model_path

    for key in ("policy", "reward", "prompts"):
        if getattr(bench, key):
            check_model_path(f"--{key}", getattr(bench, key))
    results: dict = {"machine": machine(), "config": asdict(bench)}
    results["matmul_gflops"] = {"fp32": matmul_rates(torch.float32, 1024, 5), "bf16": matmul_rates(torch.bfloat16, 512, 3)}
    results["peak_gflops"] = {dtype: max(rates.values()) for dtype, rates in results["matmul_gflops"].items()}
    if bench.precision == "auto":  # what the stages would pick, decided as they decide it
        results["auto"] = {"picked": "bf16" if training.use_bf16("auto", torch.device("cpu")) else "fp32", "measured_gflops": training.cpu_matmul_rates()}
    with tempfile.TemporaryDirectory(prefix="rlhf-bench-") as root:
        policy, reward_model = build_models(Path(root), bench.size)
        if bench.policy:
            policy = Path(bench.policy)
            results["model"] = describe(policy)
        else:
            layers, width = SIZES[bench.size]
            results["model"] = {"size": bench.size, "layers": layers, "width": width, "vocab": VOCAB, "parameters": _count_parameters(policy)}
        if bench.reward:
            reward_model = Path(bench.reward)
        if bench.prompts:  # refused here, with the file and line, rather than in every child
            from rlhf.models import load_tokenizer

            read_prompts(bench.prompts, load_tokenizer(str(policy)), bench.batch)
        for stage in bench.stages:
            results[stage] = {}
            for mode in bench.modes:
                if mode == "value-head" and stage != "ppo":
                    continue
                results[stage][mode] = in_fresh_process(stage, mode, bench, policy, reward_model)
    results["machine"]["load_after"] = float(Path("/proc/loadavg").read_text().split()[0]) if Path("/proc/loadavg").exists() else None
    return results


def describe(policy: Path) -> dict:
    """Size of a given policy, as the table names a built one."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(policy)
    return {"size": str(policy), "layers": getattr(config, "num_hidden_layers", "?"), "width": getattr(config, "hidden_size", "?"),
            "vocab": config.vocab_size, "parameters": _count_parameters(policy)}


def _count_parameters(path: Path) -> int:
    from transformers import AutoModelForCausalLM

    return sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(path).parameters())


def table(results: dict) -> str:
    """The results as plain-text tables."""
    b, m, peak = results["config"], results["machine"], results["peak_gflops"]
    model = results["model"]
    flags = ", ".join(m["flags"]) or "none of AVX2/AVX-512/AMX"
    lines = [
        f"rlhf bench: {b['size']} ({model['layers']} layers x {model['width']}, vocab {model['vocab']}, "
        f"{model['parameters'] / 1e6:.1f}M parameters), {b['precision']}, {b['batch']} prompts of <= {b['prompt_tokens']} tokens, "
        f"{b['new_tokens']} new tokens; median of {b['iterations']} after {b['warmup']} warm-up",
        f"machine: {m['cpu']} ({flags}), {m['cores']} cores, {m['threads']} threads, torch {m['torch']}, "
        f"load {m.get('load_before', float('nan')):.2f} before the run",
        *(
            f"{dtype} matrix products, GFLOP/s: " + ", ".join(f"{layout} {rate:.2f}" for layout, rate in rates.items()) + f"; peak {peak[dtype]:.2f}"
            for dtype, rates in results["matmul_gflops"].items()
        ),
    ]
    if "auto" in results:
        auto = results["auto"]
        lines.append(f"precision auto picked {auto['picked']}: a linear layer's products measured at {auto['measured_gflops']['bf16']:.0f} GFLOP/s "
                     f"in bf16 against {auto['measured_gflops']['fp32']:.0f} in fp32")
    precision = results.get("auto", {}).get("picked", b["precision"])
    reference = peak[precision]
    for mode, r in results.get("ppo", {}).items():
        it = r["iteration_s"]
        lines += [
            "",
            f"PPO iteration ({mode}): {it['median']:.3f} s median (min {it['min']:.3f}, max {it['max']:.3f}); "
            f"generate {r['generated_tokens_per_s']:,.0f} tokens/s; peak RSS {r['peak_rss_gb']:.2f} GB ({r['rss_before_models_gb']:.2f} before the models)",
            f"  {'phase':<11}{'median s':>10}{'min s':>9}{'max s':>9}{'GFLOP':>9}{'GFLOP/s':>10}{'% of peak':>11}  runs in",
        ]
        for phase, p in r["phases"].items():
            lines.append(
                f"  {phase:<11}{p['median']:>10.4f}{p['min']:>9.4f}{p['max']:>9.4f}{p['gflop']:>9.3f}{p['gflops']:>10.2f}"
                f"{100 * p['gflops'] / peak[p['precision']]:>10.1f}%  {p['precision']}"
            )
    names = {"reward": "reward model", "dpo": "DPO", "sft": "SFT"}
    for stage, unit, key in (("reward", "pairs/s", "pairs_per_s"), ("dpo", "pairs/s", "pairs_per_s"), ("sft", "tokens/s", "tokens_per_s")):
        for mode, r in results.get(stage, {}).items():
            s = r["step_s"]
            tokens = f", {r['tokens_per_s']:,.0f} tokens/s" if stage == "dpo" else ""
            lines.append(
                f"{names[stage]} step ({mode}): {s['median']:.3f} s median (min {s['min']:.3f}, max {s['max']:.3f}); "
                f"{r[key]:,.0f} {unit}{tokens}; {r['gflops']:.2f} GFLOP/s ({100 * r['gflops'] / reference:.1f}% of peak); peak RSS {r['peak_rss_gb']:.2f} GB"
            )
    return "\n".join(lines)


def main(bench: BenchConfig, json_path: str | None = None) -> dict:
    results = run(bench)
    print(json.dumps(results, indent=2))
    print()
    print(table(results))
    if json_path:
        Path(json_path).write_text(json.dumps(results, indent=2) + "\n")
    return results
