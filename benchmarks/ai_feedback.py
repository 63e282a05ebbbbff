"""AI labels against simulated human labels on the demo, at the same label count, over seeds.

    python benchmarks/ai_feedback.py --judge runs/demo/judge --seeds 0 1 2 [--pairs 1000] [--workdir runs/ai-feedback]

What it measures (the demo's judge stands in for an instruct model: `rlhf demo judge`):
1. The judge's agreement with gold on the 500 held-out gold-labelled pairs
   (prefs_eval_gold.jsonl), both orders asked, and its position-bias rate; the simulated
   labelers' agreement with gold on the same pairs, for scale.
2. Per seed: the SFT policy's samples, two per training prompt (`rlhf generate --seed`), labelled
   once by the judge (`rlhf judge --task pair`) and once by the simulated labelers
   (rlhf.demo.gold.simulated_ranking) on exactly the pairs the judge labelled; a reward model
   trained on each (its gold accuracy on the held-out pairs), PPO against each, and both
   policies' gold win-rate against SFT (`rlhf eval`).
Prints a table per seed and the mean ± sd over seeds; writes summary.json in the workdir. Each
step's output is kept: a rerun skips what is done.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from rlhf.constitution import load_constitution  # noqa: E402
from rlhf.data import load_candidates, load_feedback, write_jsonl  # noqa: E402
from rlhf.judge import Judge, JudgeConfig, judge_pairs, label_candidates  # noqa: E402

DATA = ROOT / "runs" / "demo" / "data"
SFT = ROOT / "runs" / "demo" / "sft" / "model"
RECIPE = ROOT / "recipes" / "demo.yaml"


def rlhf(*args: str) -> None:
    started = time.time()
    subprocess.run([sys.executable, "-m", "rlhf", *args], check=True, cwd=ROOT)
    print(f"  ({args[0]}: {time.time() - started:.0f} s)", flush=True)


def judge_config(judge: str, cache: Path) -> JudgeConfig:
    return JudgeConfig(backend="local", model=judge, constitution=str(ROOT / "rlhf" / "demo" / "constitution.yaml"), cache=str(cache), batch_size=16)


def held_out(judge: str, work: Path) -> dict:
    """The judge's and the simulated labelers' agreement with gold on the held-out gold pairs."""
    from rlhf.demo.gold import simulated_ranking

    pairs = load_feedback([str(DATA / "prefs_eval_gold.jsonl")])
    config = judge_config(judge, work / "judge_cache.jsonl")
    verdicts = judge_pairs(Judge(config), load_constitution(config.constitution), [(p.prompt, p.completions[0], p.completions[1], None) for p in pairs])
    read = [v for v in verdicts if v.value is not None]
    both = [v for v in read if v.consistent is not None]
    rng = random.Random(0)
    simulated = [simulated_ranking(p.prompt, list(p.completions), rng)[0][0] == p.completions[0] for p in pairs]
    return {
        "pairs": len(pairs), "unparseable": len(verdicts) - len(read),
        "judge_agreement": sum((v.value > 0.5) + 0.5 * (v.value == 0.5) for v in read) / len(read),
        "position_bias_rate": sum(not v.consistent for v in both) / len(both) if both else None,
        "simulated_agreement": sum(simulated) / len(simulated),
    }


def gold_agreement(records: list) -> float:
    from rlhf.demo.gold import gold_score

    return statistics.mean(gold_score(r.prompt, r.completions[0]) > gold_score(r.prompt, r.completions[1]) for r in records)


def one_seed(judge: str, seed: int, pairs: int, work: Path) -> dict:
    from rlhf.demo.gold import simulated_ranking

    work.mkdir(parents=True, exist_ok=True)
    prompts = [json.loads(line) for line in (DATA / "prompts_train.jsonl").read_text().splitlines()]
    subset = work / "prompts.jsonl"
    if not subset.exists():
        write_jsonl(subset, random.Random(seed).sample(prompts, min(pairs, len(prompts))))
    candidates = work / "candidates.jsonl"
    if not candidates.exists():
        rlhf("generate", "--model", str(SFT), "--prompts", str(subset), "--out", str(candidates), "--num", "2", "--seed", str(seed), "--max-new-tokens", "48")
    ai = work / "ai_prefs.jsonl"
    if not ai.exists():
        summary = label_candidates(judge_config(judge, work / "judge_cache.jsonl"), [str(candidates)], ai, "pair")
        print(f"  judge: {summary['labels']} labels of {summary['pairs']} pairs, position-bias {summary['position_bias_rate']:.1%}", flush=True)
    human = work / "human_prefs.jsonl"
    if not human.exists():
        rng = random.Random(f"{seed}/human")
        rows = []
        for r in (json.loads(line) for line in ai.read_text().splitlines()):
            ranking, name = simulated_ranking(r["prompt"], [r["chosen"], r["rejected"]], rng)
            rows.append({"prompt": r["prompt"], "chosen": ranking[0], "rejected": ranking[1], "labeler": name})
        write_jsonl(human, rows)
    result = {"seed": seed, "labels": len(ai.read_text().splitlines())}
    for name, labels in (("ai", ai), ("human", human)):
        result[f"{name}_label_gold_agreement"] = gold_agreement(load_feedback([str(labels)]))
        rm, policy = work / f"rm-{name}", work / f"ppo-{name}"
        if not (rm / "eval.json").exists():
            rlhf("reward", "--config", str(RECIPE), f"reward.data.train=[{labels}]", f"reward.output_dir={rm}", f"reward.seed={seed}")
        result[f"{name}_rm_gold_accuracy"] = json.loads((rm / "eval.json").read_text())["accuracy"]
        if not (policy / "model" / "config.json").exists():
            rlhf("ppo", "--config", str(RECIPE), f"ppo.reward.path={rm / 'model'}", f"ppo.output_dir={policy}", f"ppo.seed={seed}")
    evaluated = work / "eval"
    if not (evaluated / "results.json").exists():
        rlhf("eval", "--config", str(RECIPE), f"eval.policies=[{work / 'ppo-ai' / 'model'},{work / 'ppo-human' / 'model'}]", "eval.runs=[]",
             f"eval.reward.path={work / 'rm-human' / 'model'}", f"eval.output_dir={evaluated}", f"eval.seed={seed}")
    rows = json.loads((evaluated / "results.json").read_text())
    for name in ("ai", "human"):
        row = next(r for r in rows if f"ppo-{name}" in r["policy"])
        result[f"{name}_ppo_gold_win_rate"] = row["win_rate_gold"]
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--judge", required=True, help="the judge model directory (rlhf demo judge --out DIR)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--pairs", type=int, default=1000, help="prompts sampled twice each: the label count before ties and unparseable answers")
    parser.add_argument("--workdir", default=str(ROOT / "runs" / "ai-feedback"))
    args = parser.parse_args()
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    if not (DATA / "sft.jsonl").exists():
        rlhf("demo", "data", "--out", str(DATA))
    if not (SFT / "config.json").exists():
        rlhf("sft", "--config", str(RECIPE))
    agreement = held_out(args.judge, work)
    print(f"held-out gold pairs: judge agreement {agreement['judge_agreement']:.1%}, position-bias rate {agreement['position_bias_rate']:.1%}, "
          f"unparseable {agreement['unparseable']}; simulated labelers {agreement['simulated_agreement']:.1%}", flush=True)
    seeds = []
    for seed in args.seeds:
        print(f"seed {seed}", flush=True)
        seeds.append(one_seed(args.judge, seed, args.pairs, work / f"s{seed}"))
    keys = [("label_gold_agreement", "labels agree with gold"), ("rm_gold_accuracy", "reward model gold accuracy"), ("ppo_gold_win_rate", "PPO gold win-rate vs SFT")]
    print(f"\n| measure | AI labels (judge) | human labels (simulated) |\n|---|---|---|")
    print(f"| labels per seed | {', '.join(str(s['labels']) for s in seeds)} | the same pairs |")
    for key, name in keys:
        cells = []
        for who in ("ai", "human"):
            values = [100 * s[f"{who}_{key}"] for s in seeds]
            spread = f" ± {statistics.stdev(values):.1f}" if len(values) > 1 else ""
            cells.append(f"{statistics.mean(values):.1f}{spread} ({', '.join(f'{v:.1f}' for v in values)})")
        print(f"| {name} (%) | {cells[0]} | {cells[1]} |")
    (work / "summary.json").write_text(json.dumps({"held_out": agreement, "seeds": seeds}, indent=2) + "\n")


if __name__ == "__main__":
    main()
