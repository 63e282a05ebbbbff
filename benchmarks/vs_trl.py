"""This project's stages against TRL's on identical fixtures, interleaved, on this machine.

    python benchmarks/vs_trl.py                       # 3 rounds, fp32, venvs and fixtures under /tmp/rlhf-vs-trl
    python benchmarks/vs_trl.py --precision bf16      # both under bf16 autocast (TRL's default, bf16=True)
    python benchmarks/vs_trl.py --openmp spin         # both with libgomp's spinning threads (rlhf waits passively)
    python benchmarks/vs_trl.py --rounds 5 --workdir DIR

It builds two environments of its own, pinned: TRL 0.24 (the last with `PPOTrainer`) and TRL
1.16 (`RewardTrainer`, `DPOTrainer`), each with torch 2.13.0 first (`pip install torch==2.13.0`,
then `trl==X`). Then it writes one set of fixtures with this project's Python:

- a random-init GPT-2, 4 layers x 256, a 3,000-word word-level tokenizer; a reward model of the
  same shape (`GPT2ForSequenceClassification`, one output), which is also the value model;
- 16 prompts of 8 to 16 tokens (`prompts.jsonl`, token ids), 32 new tokens per response;
- 16 pairs for the reward-model and DPO steps: each prompt with two completions of 32 random
  tokens and EOS (`pairs.jsonl`, token ids), made by the function `rlhf bench` uses itself.

and runs, in each round, one after the other (A B A B): TRL's PPO as shipped; TRL's PPO without
its two `gc.collect()` per iteration; `rlhf bench --policy --reward --prompts` on the same
fixtures (PPO, reward model, DPO); TRL's reward model; TRL's DPO. Both sides run in one
precision: fp32 (TRL's `bf16=False`, `rlhf bench --precision fp32`) or bf16 autocast (TRL's
`bf16=True`, its default in all three configs; `--precision bf16`), with the same thread count
and the same OpenMP waiting (`--openmp`: passive, as `rlhf` sets it, or libgomp's default spin),
one PPO epoch of one minibatch, gradient checkpointing off (TRL 1.16 turns it on by default),
DPO's reference log-probs computed before the timed steps on both sides
(`precompute_ref_log_probs`). A TRL step is the time between two `on_step_end` callbacks: all of
an iteration, as `rlhf bench` times its own. TRL's PPO phases are timed by wrapping the
functions its loop calls (`batch_generation`, `forward` without gradients for the reference,
`get_reward` for the value and the score); its "train" is the rest of the iteration.

Prints each run, then the medians over rounds and the ratios TRL / rlhf (above 1: rlhf faster).
The machine is noisy: compare ratios from one run of this script, not numbers across machines.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

TRL_PPO, TRL_TRAINERS = "0.24.0", "1.16.0"
OPENMP = {
    # how an OpenMP thread waits for the next parallel region: rlhf's default, then libgomp's own
    "passive": {"OMP_WAIT_POLICY": "PASSIVE"},
    "spin": {"OMP_WAIT_POLICY": "PASSIVE", "GOMP_SPINCOUNT": "300000"},  # an explicit count overrides the policy's 0
}
OPENMP_ENV: dict[str, str] = {}  # the environment of every timed process, set by main
TORCH = "torch==2.13.0"
PROMPTS, PROMPT_TOKENS, NEW_TOKENS, VOCAB = 16, 16, 32, 3000
WARMUP, ITERATIONS = 2, 10


# ---------------------------------------------------------------------------------------------
# Run in TRL's environments (no import of this project there)


class Steps:
    """A `TrainerCallback` that keeps the time of each `on_step_end`, and the PPO phases between."""

    def __init__(self):
        from transformers import TrainerCallback

        steps = self

        class Callback(TrainerCallback):
            def on_step_end(self, args, state, control, **kwargs):
                steps.ends.append(time.perf_counter())
                steps.phases.append(steps.current)
                steps.current = {}

        self.ends, self.phases, self.current, self.callback = [], [], {}, Callback()

    def timed(self, name, function):
        def wrapper(*args, **kwargs):
            started = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                self.current[name] = self.current.get(name, 0.0) + time.perf_counter() - started
        return wrapper

    def intervals(self) -> list[float]:
        """Seconds of each step after the warm-up (the first step has no start: it is warm-up)."""
        times = [b - a for a, b in zip(self.ends, self.ends[1:])]
        return times[WARMUP - 1:]


def trl_ppo(fixtures: Path, shipped: bool, bf16: bool) -> dict:
    import tempfile

    import torch
    import trl.trainer.ppo_trainer as ppo_trainer
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer
    from trl import PPOConfig, PPOTrainer

    steps = Steps()
    if not shipped:  # only the trainer's own gc.collect() calls, one after the rollout, one after the update
        ppo_trainer.gc = type("NoCollect", (), {"collect": staticmethod(lambda *a, **k: 0)})
    ppo_trainer.batch_generation = steps.timed("generate", ppo_trainer.batch_generation)
    forward = ppo_trainer.forward
    timed_forward = steps.timed("reference", forward)
    ppo_trainer.forward = lambda *a, **k: forward(*a, **k) if torch.is_grad_enabled() else timed_forward(*a, **k)
    get_reward = ppo_trainer.get_reward

    tokenizer = AutoTokenizer.from_pretrained(fixtures / "policy", padding_side="left")
    prompts = [json.loads(line)["input_ids"] for line in (fixtures / "prompts.jsonl").read_text().splitlines()]
    policy = AutoModelForCausalLM.from_pretrained(fixtures / "policy")
    reference = AutoModelForCausalLM.from_pretrained(fixtures / "policy")
    reward_model = AutoModelForSequenceClassification.from_pretrained(fixtures / "reward", num_labels=1)
    value_model = AutoModelForSequenceClassification.from_pretrained(fixtures / "reward", num_labels=1)

    def timed_reward(model, *args, **kwargs):
        name = "score" if model is reward_model else "value"
        started = time.perf_counter()
        try:
            return get_reward(model, *args, **kwargs)
        finally:
            steps.current[name] = steps.current.get(name, 0.0) + time.perf_counter() - started

    ppo_trainer.get_reward = timed_reward
    with tempfile.TemporaryDirectory() as out:
        config = PPOConfig(
            output_dir=out, per_device_train_batch_size=PROMPTS, gradient_accumulation_steps=1, num_mini_batches=1, num_ppo_epochs=1,
            response_length=NEW_TOKENS, temperature=0.7, total_episodes=PROMPTS * (WARMUP + ITERATIONS), local_rollout_forward_batch_size=PROMPTS,
            num_sample_generations=0, missing_eos_penalty=None, stop_token=None, learning_rate=1e-5, lr_scheduler_type="constant",
            report_to="none", save_strategy="no", logging_steps=10_000, disable_tqdm=True, use_cpu=True, bf16=bf16, seed=0,
        )
        trainer = PPOTrainer(args=config, processing_class=tokenizer, model=policy, ref_model=reference, reward_model=reward_model,
                             value_model=value_model, train_dataset=Dataset.from_dict({"input_ids": prompts}), callbacks=[steps.callback])
        trainer.train()
    times = steps.intervals()
    phases = {name: statistics.median(p.get(name, 0.0) for p in steps.phases[WARMUP:]) for name in ("generate", "score", "value", "reference")}
    phases["train and the rest"] = statistics.median(t - sum(p.values()) for t, p in zip(times, steps.phases[WARMUP:]))
    return {"iteration_s": statistics.median(times), "min_s": min(times), "max_s": max(times), "phases": phases,
            "generated_tokens_per_s": PROMPTS * NEW_TOKENS / phases["generate"], "threads": torch.get_num_threads()}


def trl_pairs(fixtures: Path, trainer_name: str, bf16: bool) -> dict:
    import tempfile

    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer
    from trl import DPOConfig, DPOTrainer, RewardConfig, RewardTrainer

    steps = Steps()
    tokenizer = AutoTokenizer.from_pretrained(fixtures / "policy")
    pairs = [json.loads(line) for line in (fixtures / "pairs.jsonl").read_text().splitlines()]
    common = dict(per_device_train_batch_size=len(pairs), gradient_accumulation_steps=1, max_steps=WARMUP + ITERATIONS + 1, learning_rate=1e-5,
                  lr_scheduler_type="constant", gradient_checkpointing=False, bf16=bf16, use_cpu=True, report_to="none", save_strategy="no",
                  logging_steps=10_000, disable_tqdm=True, dataloader_num_workers=0, seed=0)
    with tempfile.TemporaryDirectory() as out:
        if trainer_name == "reward":
            model = AutoModelForSequenceClassification.from_pretrained(fixtures / "reward", num_labels=1)
            data = Dataset.from_dict({"chosen_ids": [p["prompt_ids"] + p["chosen_ids"] for p in pairs],
                                      "rejected_ids": [p["prompt_ids"] + p["rejected_ids"] for p in pairs]})
            trainer = RewardTrainer(model=model, args=RewardConfig(output_dir=out, **common), train_dataset=data,
                                    processing_class=tokenizer, callbacks=[steps.callback])
        else:
            # DPOTrainer 1.16 takes text only: the word-level tokenizer reads "w5 w6" back as [5, 6] exactly, and
            # the trainer appends EOS to each completion as the pairs have it
            model = AutoModelForCausalLM.from_pretrained(fixtures / "policy")
            text = lambda ids: " ".join(tokenizer.convert_ids_to_tokens(ids))  # noqa: E731
            data = Dataset.from_dict({"prompt": [text(p["prompt_ids"]) for p in pairs], "chosen": [" " + text(p["chosen_ids"][:-1]) for p in pairs],
                                      "rejected": [" " + text(p["rejected_ids"][:-1]) for p in pairs]})
            assert tokenizer(data[0]["prompt"] + data[0]["chosen"] + tokenizer.eos_token)["input_ids"] == pairs[0]["prompt_ids"] + pairs[0]["chosen_ids"]
            trainer = DPOTrainer(model=model, args=DPOConfig(output_dir=out, precompute_ref_log_probs=True, **common), train_dataset=data,
                                 processing_class=tokenizer, callbacks=[steps.callback])
        trainer.train()
    times = steps.intervals()
    return {"step_s": statistics.median(times), "min_s": min(times), "max_s": max(times), "pairs_per_s": len(pairs) / statistics.median(times),
            "threads": torch.get_num_threads()}


# ---------------------------------------------------------------------------------------------
# Run in this project's environment


def venv(workdir: Path, trl: str) -> Path:
    """A virtual environment with torch 2.13.0 and trl==`trl`, built once."""
    root = workdir / f"trl-{trl}"
    python = root / "bin" / "python"
    if not (root / ".installed").exists():
        print(f"building {root}: {TORCH}, then trl=={trl}", flush=True)
        subprocess.run([sys.executable, "-m", "venv", str(root)], check=True)
        subprocess.run([str(python), "-m", "pip", "install", "-q", TORCH], check=True)
        subprocess.run([str(python), "-m", "pip", "install", "-q", f"trl=={trl}"], check=True)
        (root / ".installed").write_text(subprocess.run([str(python), "-m", "pip", "freeze"], capture_output=True, text=True, check=True).stdout)
    return python


def build_fixtures(root: Path) -> Path:
    from rlhf.bench import BenchConfig, build_models, pairs, random_prompts
    from rlhf.models import load_tokenizer

    fixtures = root / "fixtures"
    if (fixtures / "pairs.jsonl").exists():
        return fixtures
    policy, _ = build_models(fixtures, "tiny", vocab=VOCAB)
    prompts = random_prompts(PROMPTS, PROMPT_TOKENS, words=list(range(3, VOCAB)))
    (fixtures / "prompts.jsonl").write_text("".join(json.dumps({"input_ids": p}) + "\n" for p in prompts))
    bench = BenchConfig(batch=PROMPTS, new_tokens=NEW_TOKENS, prompts=str(fixtures / "prompts.jsonl"), policy=str(policy))
    with (fixtures / "pairs.jsonl").open("w") as f:
        for prompt, (chosen, rejected) in pairs(bench, load_tokenizer(str(policy)), 2):  # the rlhf bench's own pairs
            f.write(json.dumps({"prompt_ids": prompt, "chosen_ids": chosen[len(prompt):], "rejected_ids": rejected[len(prompt):]}) + "\n")
    return fixtures


def child(python: Path, *args: str) -> dict:
    result = subprocess.run([str(python), __file__, *args], capture_output=True, text=True, env=OPENMP_ENV)
    if result.returncode:
        sys.exit(f"{' '.join(args)} failed:\n{result.stderr[-4000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def rlhf_bench(fixtures: Path, out: Path, precision: str) -> dict:
    command = [sys.executable, "-m", "rlhf", "bench", "--policy", str(fixtures / "policy"), "--reward", str(fixtures / "reward"),
               "--prompts", str(fixtures / "prompts.jsonl"), "--batch", str(PROMPTS), "--new-tokens", str(NEW_TOKENS), "--precision", precision,
               "--iterations", str(ITERATIONS), "--warmup", str(WARMUP), "--stages", "ppo", "reward", "dpo", "--json", str(out)]
    subprocess.run(command, check=True, capture_output=True, env=OPENMP_ENV)
    r = json.loads(out.read_text())
    ppo = r["ppo"]["full"]
    return {
        "ppo": {"iteration_s": ppo["iteration_s"]["median"], "min_s": ppo["iteration_s"]["min"], "max_s": ppo["iteration_s"]["max"],
                "phases": {name: p["median"] for name, p in ppo["phases"].items()}, "generated_tokens_per_s": ppo["generated_tokens_per_s"]},
        "reward": {"step_s": r["reward"]["full"]["step_s"]["median"], "pairs_per_s": r["reward"]["full"]["pairs_per_s"]},
        "dpo": {"step_s": r["dpo"]["full"]["step_s"]["median"], "pairs_per_s": r["dpo"]["full"]["pairs_per_s"]},
        "machine": r["machine"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="fp32", help="both sides in fp32, or both under bf16 autocast")
    parser.add_argument("--openmp", choices=list(OPENMP), default="passive",
                        help="both sides' OpenMP threads wait passively (rlhf's default) or spin first (libgomp's default, what TRL runs with alone)")
    parser.add_argument("--workdir", default="/tmp/rlhf-vs-trl")
    parser.add_argument("--json", help="also write every run to this file")
    args = parser.parse_args()
    OPENMP_ENV.update({**os.environ, **OPENMP[args.openmp]})
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    ppo_python, trainers_python = venv(workdir, TRL_PPO), venv(workdir, TRL_TRAINERS)
    fixtures = build_fixtures(workdir)
    load = float(Path("/proc/loadavg").read_text().split()[0]) if Path("/proc/loadavg").exists() else float("nan")
    print(f"fixtures in {fixtures}; load {load:.2f} before the first run", flush=True)
    runs = {"trl_ppo_shipped": [], "trl_ppo_no_gc": [], "rlhf": [], "trl_reward": [], "trl_dpo": []}
    for round_ in range(1, args.rounds + 1):
        for name, run in (
            ("trl_ppo_shipped", lambda: child(ppo_python, "trl-ppo", str(fixtures), "shipped", args.precision)),
            ("trl_ppo_no_gc", lambda: child(ppo_python, "trl-ppo", str(fixtures), "no-gc", args.precision)),
            ("rlhf", lambda: rlhf_bench(fixtures, workdir / f"rlhf-{round_}.json", args.precision)),
            ("trl_reward", lambda: child(trainers_python, "trl-pairs", str(fixtures), "reward", args.precision)),
            ("trl_dpo", lambda: child(trainers_python, "trl-pairs", str(fixtures), "dpo", args.precision)),
        ):
            result = run()
            runs[name].append(result)
            shown = result["ppo"]["iteration_s"] if name == "rlhf" else result.get("iteration_s", result.get("step_s"))
            print(f"round {round_}: {name:<16} {shown:.3f} s" + (f" (reward {result['reward']['step_s']:.3f} s, dpo {result['dpo']['step_s']:.3f} s)" if name == "rlhf" else ""), flush=True)
    print(report(runs, load, f"{args.precision}, OpenMP {args.openmp} ({' '.join(f'{k}={v}' for k, v in OPENMP[args.openmp].items())})"))
    if args.json:
        Path(args.json).write_text(json.dumps(runs, indent=2) + "\n")


def report(runs: dict, load: float, setting: str) -> str:
    median = lambda values: statistics.median(values)  # noqa: E731
    ours = runs["rlhf"]
    m = ours[0]["machine"]
    ppo = median(r["ppo"]["iteration_s"] for r in ours)
    shipped, no_gc = median(r["iteration_s"] for r in runs["trl_ppo_shipped"]), median(r["iteration_s"] for r in runs["trl_ppo_no_gc"])
    lines = ["", f"machine: {m['cpu']} ({', '.join(m['flags'])}), {m['cores']} cores, {m['threads']} threads, torch {m['torch']}; load {load:.2f} before",
             f"both sides: {setting}; medians over {len(ours)} interleaved rounds; ratio = TRL / rlhf (above 1: rlhf faster)", "",
             f"PPO iteration: rlhf {ppo:.3f} s; TRL {TRL_PPO} as shipped {shipped:.3f} s ({shipped / ppo:.2f}x); "
             f"without its gc.collect {no_gc:.3f} s ({no_gc / ppo:.2f}x)",
             f"per round (shipped / no gc / rlhf): " + "; ".join(f"{a['iteration_s']:.3f} / {b['iteration_s']:.3f} / {c['ppo']['iteration_s']:.3f}"
                                                             for a, b, c in zip(runs["trl_ppo_shipped"], runs["trl_ppo_no_gc"], ours)),
             f"generation: rlhf {median(r['ppo']['generated_tokens_per_s'] for r in ours):,.0f} tokens/s, "
             f"TRL {median(r['generated_tokens_per_s'] for r in runs['trl_ppo_shipped']):,.0f} tokens/s", "",
             f"  {'phase (s)':<20}{'rlhf':>8}{'TRL shipped':>13}{'TRL no gc':>11}"]
    phases = [(name, name) for name in ("generate", "score", "value", "reference")] + [("advantages+train", "train and the rest")]
    for ours_name, trl_name in phases:
        if ours_name == "advantages+train":
            mine = median(r["ppo"]["phases"]["advantages"] + r["ppo"]["phases"]["train"] for r in ours)
        else:
            mine = median(r["ppo"]["phases"].get(ours_name, 0.0) for r in ours)  # no value phase where the update gives the values
        lines.append(f"  {ours_name:<20}{mine:>8.3f}{median(r['phases'][trl_name] for r in runs['trl_ppo_shipped']):>13.3f}"
                     f"{median(r['phases'][trl_name] for r in runs['trl_ppo_no_gc']):>11.3f}")
    for stage, trl in (("reward", "trl_reward"), ("dpo", "trl_dpo")):
        mine, theirs = median(r[stage]["pairs_per_s"] for r in ours), median(r["pairs_per_s"] for r in runs[trl])
        lines.append(f"{'reward model' if stage == 'reward' else 'DPO'} step, pairs/s: rlhf {mine:.1f}, TRL {TRL_TRAINERS} {theirs:.1f} ({mine / theirs:.2f}x)")
    return "\n".join(lines)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] in ("trl-ppo", "trl-pairs"):
        import transformers

        transformers.logging.set_verbosity_error()
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        fixtures, what, bf16 = Path(sys.argv[2]), sys.argv[3], sys.argv[4] == "bf16"
        result = trl_ppo(fixtures, what == "shipped", bf16) if sys.argv[1] == "trl-ppo" else trl_pairs(fixtures, what, bf16)
        print(json.dumps(result))
    else:
        main()
