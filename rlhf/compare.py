"""Every algorithm on one recipe at an equal budget, three seeds each, in one report.

    rlhf compare recipes/demo.yaml [compare.seeds=[0,1,2] compare.algorithms=[ppo,grpo,dpo] ...]

The budget is the same for every algorithm: the same SFT model and the same labels (one reward
model trained on the recipe's preference data, which DPO trains on directly), the same prompt
file, and for the RL algorithms the same number of sampled responses (PPO's `algo.batch_size`
a step for `stop.max_steps` steps; the critic-free family gets batch_size / group_size prompts a
step). Each run is its own process, so its wall time and peak memory are its own; a run whose
model is there is not run again, so an interrupted comparison continues where it stopped.

Writes `compare.output_dir/report.md` with the table (mean and spread over seeds of the gold and
reward-model win-rates against SFT, KL, distinct responses, wall time, peak memory) and
`overoptimisation.png`, the curve of Gao et al. 2022: the gold and the proxy (reward-model)
score of each step's rollouts against the square root of their KL to the reference, along each
RL run, with DPO's (and SFT's) held-out evaluation as points. Where gold peaks and falls while the
proxy still rises, the policy is over-optimising the reward model.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import os
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml
from tqdm.auto import tqdm

from rlhf.config import ConfigError, to_dict
from rlhf.tracking import read_metrics

log = logging.getLogger(__name__)

GROUP_ESTIMATORS = ("grpo", "dr_grpo", "rloo", "reinforce_pp", "reinforce_pp_baseline")
ALGORITHMS = ("ppo", *GROUP_ESTIMATORS, "dpo")


@dataclass
class CompareConfig:
    algorithms: list[str] = field(default_factory=lambda: ["ppo", "grpo", "rloo", "reinforce_pp_baseline", "dpo"])
    """Algorithms to run: ppo (the recipe's ppo section), grpo, dr_grpo, rloo, reinforce_pp, reinforce_pp_baseline (its grpo section with that estimator), dpo (its dpo section)."""
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    """Seeds each algorithm runs with."""
    output_dir: str = "runs/compare"
    """Where each run, each seed's evaluation, report.md and the plots go."""


def check_config(recipe) -> None:
    config, ppo = recipe.compare, recipe.ppo
    unknown = [a for a in config.algorithms if a not in ALGORITHMS]
    if unknown or not config.algorithms:
        raise ConfigError(f"compare.algorithms: each must be one of {', '.join(ALGORITHMS)}, got {unknown or config.algorithms}")
    if not config.seeds:
        raise ConfigError("compare.seeds: give at least one seed")
    if not recipe.eval.oracle:
        raise ConfigError("eval.oracle is required: the comparison is by the gold scorer (e.g. rlhf.demo.gold:score)")
    K = recipe.grpo.algo.group_size
    if any(a in GROUP_ESTIMATORS for a in config.algorithms) and ppo.algo.batch_size % K:
        raise ConfigError(f"grpo.algo.group_size: must divide ppo.algo.batch_size={ppo.algo.batch_size} (the responses a step every RL algorithm samples), got {K}")


def run_configs(recipe, algorithm: str, seed: int, out: Path) -> tuple[str, dict]:
    """(stage, its config section as a dict) of one run, with the budget made equal to PPO's."""
    ppo = recipe.ppo
    if algorithm == "ppo":
        config = copy.deepcopy(ppo)
    elif algorithm == "dpo":
        config = copy.deepcopy(recipe.dpo)
        config.data.train = list(recipe.reward.data.train)  # the reward model's labels, no more
    else:
        config = copy.deepcopy(recipe.grpo)
        config.algo.estimator = algorithm
        config.algo.batch_size = ppo.algo.batch_size // config.algo.group_size
        config.stop.max_steps = ppo.stop.max_steps
    if algorithm != "dpo":
        config.policy, config.oracle = ppo.policy, recipe.eval.oracle
        config.prompts, config.reward = copy.deepcopy(ppo.prompts), copy.deepcopy(ppo.reward)
    config.seed, config.output_dir = seed, str(out)
    return ("ppo" if algorithm == "ppo" else "dpo" if algorithm == "dpo" else "grpo"), to_dict(config)


def run_one(stage: str, section: dict, out: Path) -> dict:
    """Train in a child process from a recipe of its own (kept in the run's directory); returns
    its wall time and peak resident memory, which `run.json` keeps."""
    done = out / "run.json"
    if done.exists() and (out / "model").exists():
        return json.loads(done.read_text())
    out.mkdir(parents=True, exist_ok=True)
    recipe = out / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({stage: section}, sort_keys=False))
    started = time.perf_counter()
    with (out / "log.txt").open("w") as log_file:
        child = subprocess.Popen([sys.executable, "-m", "rlhf", stage, "--config", str(recipe)], stdout=log_file, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(child.pid, 0)
    child.returncode = os.waitstatus_to_exitcode(status)
    if child.returncode:
        raise RuntimeError(f"rlhf {stage} --config {recipe} failed (exit {child.returncode}); its output is in {out / 'log.txt'}")
    stats = {"wall_s": time.perf_counter() - started, "peak_rss_gb": usage.ru_maxrss / 2**20}
    done.write_text(json.dumps(stats) + "\n")
    return stats


def evaluate_seed(recipe, seed: int, models: dict[str, str], out: Path) -> dict[str, dict]:
    """Each algorithm's policy of one seed against SFT on the held-out prompts: {name: row}."""
    from rlhf import evaluation

    results = out / "results.json"
    evaluated = {row["policy"] for row in json.loads(results.read_text())} if results.exists() else set()
    if not set(models.values()) <= evaluated:  # an algorithm added since: evaluate the seed again
        config = copy.deepcopy(recipe.eval)
        config.reference, config.policies, config.runs = recipe.ppo.policy, list(models.values()), []
        config.seed, config.output_dir = seed, str(out)
        evaluation.evaluate(config)
    rows = json.loads(results.read_text())
    names = {path: name for name, path in models.items()}
    return {names.get(row["policy"], "sft"): row for row in rows}


def run(recipe) -> Path:
    """Train and evaluate every (algorithm, seed); write the report; returns its path."""
    from rlhf import reward, sft

    check_config(recipe)
    config = recipe.compare
    root = Path(config.output_dir)
    # the shared starting point and labels, trained once
    if not Path(recipe.ppo.policy).exists():
        sft.train(recipe.sft)
    if recipe.ppo.reward.kind == "model" and not Path(recipe.ppo.reward.path).exists():
        reward.train(recipe.reward)
    runs = [(a, s) for s in config.seeds for a in config.algorithms]
    stats, rows = {}, {}
    for algorithm, seed in tqdm(runs, desc="compare", dynamic_ncols=True):
        out = root / f"{algorithm}-s{seed}"
        stage, section = run_configs(recipe, algorithm, seed, out)
        log.info("compare: %s, seed %d -> %s", algorithm, seed, out)
        stats[algorithm, seed] = run_one(stage, section, out)
    for seed in config.seeds:
        models = {a: str(root / f"{a}-s{seed}" / "model") for a in config.algorithms}
        for name, row in evaluate_seed(recipe, seed, models, root / f"eval-s{seed}").items():
            rows[name, seed] = row
    curves = {(a, s): read_metrics(root / f"{a}-s{s}") for a, s in runs if a != "dpo"}
    plot = plot_overoptimisation(curves, rows, config, root)
    report = root / "report.md"
    report.write_text(render_report(config, stats, rows, curves, plot))
    (root / "results.json").write_text(json.dumps({"runs": [{"algorithm": a, "seed": s, **stats[a, s], **rows[a, s]} for a, s in runs]}, indent=2) + "\n")
    return report


def mean_sd(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def smooth(values: list[float], window: int = 5) -> list[float]:
    """Trailing mean over `window` steps: a step's rollout is 64 responses, noisy on its own."""
    return [statistics.fmean(values[max(0, i - window + 1) : i + 1]) for i in range(len(values))]


def gold_peak(metrics: list[dict]) -> tuple[float, float, float] | None:
    """(peak, last, proxy rise after the peak) of the smoothed gold score along a run, or None."""
    gold = smooth([m["gold/mean"] for m in metrics if "gold/mean" in m])
    proxy = smooth([m["score/mean"] for m in metrics if "gold/mean" in m])
    if not gold:
        return None
    peak = max(range(len(gold)), key=gold.__getitem__)
    return gold[peak], gold[-1], proxy[-1] - proxy[peak]


def render_report(config: CompareConfig, stats: dict, rows: dict, curves: dict, plot: str) -> str:
    seeds = config.seeds
    lines = [
        "# Algorithm comparison", "",
        f"Every algorithm from the same SFT model with the same labels and prompts, seeds {', '.join(map(str, seeds))}; "
        "each cell is the mean ± sd over seeds. Win-rates are against SFT on the held-out prompts "
        f"({rows['sft', seeds[0]]['prompts']} of them); KL and distinct responses are those of the evaluation's samples.", "",
        "| algorithm | gold win-rate | RM win-rate | gold − RM gap | KL to SFT | distinct /100 | wall time (s) | peak memory (GiB) | gold peak → end (rollouts) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    def cell(values: list[float], fmt: str) -> str:
        mean, sd = mean_sd(values)
        return f"{fmt.format(mean)} ± {fmt.replace('+', '').format(sd)}"

    for algorithm in config.algorithms:
        r = [rows[algorithm, s] for s in seeds]
        st = [stats[algorithm, s] for s in seeds]
        peaks = [gold_peak(curves[algorithm, s]) for s in seeds] if algorithm != "dpo" else []
        peak = ", ".join(f"{p:.2f} → {e:.2f}" for p, e, _ in filter(None, peaks)) or "(offline)"
        lines.append(
            f"| {algorithm} | {cell([100 * x['win_rate_gold'] for x in r], '{:.1f}%')} | {cell([100 * x['win_rate_rm'] for x in r], '{:.1f}%')} "
            f"| {cell([100 * (x['win_rate_gold'] - x['win_rate_rm']) for x in r], '{:+.1f}')} | {cell([x['kl'] for x in r], '{:.2f}')} "
            f"| {cell([x['distinct_per_100'] for x in r], '{:.0f}')} | {cell([x['wall_s'] for x in st], '{:.0f}')} "
            f"| {cell([x['peak_rss_gb'] for x in st], '{:.2f}')} | {peak} |"
        )
    lines += ["", "Per seed (gold win-rate):", ""]
    lines += [f"- {a}: " + ", ".join(f"seed {s} {100 * rows[a, s]['win_rate_gold']:.1f}%" for s in seeds) for a in config.algorithms]
    lines += ["", "## Over-optimisation", "",
              "Gold and proxy (reward-model) score of each step's rollouts against √KL to the reference, one line per run "
              "(trailing mean over 5 steps); points are held-out evaluations. Gold falling while the proxy rises is "
              "over-optimisation of the reward model (Gao et al. 2022). The last column of the table gives each run's "
              "smoothed gold at its peak and at its end.", "", f"![over-optimisation]({plot})", ""]
    return "\n".join(lines)


def plot_overoptimisation(curves: dict, rows: dict, config: CompareConfig, root: Path) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.6))
    colours = {a: f"C{i}" for i, a in enumerate(config.algorithms)}
    for (algorithm, seed), metrics in curves.items():
        steps = [m for m in metrics if "gold/mean" in m]
        x = [math.sqrt(max(m["kl/sequence"], 0.0)) for m in steps]
        for ax, key in zip(axes, ("gold/mean", "score/mean")):
            ax.plot(smooth(x), smooth([m[key] for m in steps]), color=colours[algorithm], alpha=0.75, lw=1.3,
                    label=algorithm if seed == config.seeds[0] else None)
    for (name, seed), row in rows.items():
        if name in ("dpo", "sft"):
            colour = colours.get(name, "black")
            for ax, key in zip(axes, ("gold", "score")):
                ax.scatter([math.sqrt(max(row["kl"], 0.0))], [row[key]], color=colour, marker="*" if name == "dpo" else "o", s=60,
                           label=f"{name} (eval)" if seed == config.seeds[0] else None, zorder=3)
    for ax, title in zip(axes, ("gold score (never trained on)", "proxy: reward-model score")):
        ax.set_xlabel("√KL to the reference (per sequence)")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(root / "overoptimisation.png", dpi=110)
    plt.close(fig)
    return "overoptimisation.png"
