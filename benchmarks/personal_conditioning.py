"""How to condition the reward model on the labeler: a head per labeler, or a labeler embedding.

    python benchmarks/personal_conditioning.py [--recipe recipes/demo.yaml] [--seeds 0 1 2] [--out runs/personal-conditioning]

Both train on the recipe's `personalize.feedback` from its `reward` section and are measured
on `personalize.eval_feedback`: per labeler, held-out accuracy on their own labels.

    heads       `reward.personal.enabled`: the pooled score plus a column per labeler on one trunk
    embedding   the labeler as a learned input: each labelled record is trained twice, as is (the
                pooled score) and with the line "Labeler: NAME" before its prompt, whose tokens'
                embeddings the model learns to read; a labeler's score is that of the tagged text,
                shrunk towards the pooled one as the heads are, n / (n + prior_labels)

Each variant is trained by `rlhf reward` in its own process, once per seed; the table gives the
mean and spread over seeds and each variant's training time (the embedding trains twice the
sequences). Prints the table and writes it to OUT/report.md.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import yaml

from rlhf.config import load_recipe, to_dict
from rlhf.data import Comparison, load_feedback
from rlhf.pipeline import Recipe
from rlhf.reward import accuracy
from rlhf.scoring import SequenceClassifierScore


def tag(prompt: str, labeler: str) -> str:
    return f"Labeler: {labeler}\n{prompt}"


def write_tagged(records: list[Comparison], path: Path) -> None:
    """Each record as is (no labeler: the pooled score) and, when it names one, tagged."""
    with path.open("w") as f:
        for r in records:
            f.write(json.dumps({"prompt": r.prompt, "completions": r.completions}) + "\n")
            if r.labeler:
                f.write(json.dumps({"prompt": tag(r.prompt, r.labeler), "completions": r.completions}) + "\n")


def train(recipe, variant: str, seed: int, root: Path, data: list[str]) -> tuple[Path, float]:
    out = root / f"{variant}-s{seed}"
    section = to_dict(recipe.reward)
    section.update(output_dir=str(out), seed=seed)
    section["data"].update(train=data, eval=list(recipe.personalize.eval_feedback))
    section["personal"]["enabled"] = variant == "heads"
    if not (out / "model").exists():
        out.mkdir(parents=True, exist_ok=True)
        (out / "recipe.yaml").write_text(yaml.safe_dump({"reward": section}))
        started = time.perf_counter()
        with (out / "log.txt").open("w") as log:
            subprocess.run([sys.executable, "-m", "rlhf", "reward", "--config", str(out / "recipe.yaml")], stdout=log, stderr=subprocess.STDOUT, check=True)
        (out / "time.json").write_text(json.dumps({"wall_s": time.perf_counter() - started}))
    return out / "model", json.loads((out / "time.json").read_text())["wall_s"]


def margins(score, records: list[Comparison], labeler: str | None = None) -> list[float]:
    """r_better - r_worse over every pair of every ranking, the prompts tagged for `labeler`."""
    prompts, better, worse = [], [], []
    for r in records:
        for i in range(len(r.completions)):
            for j in range(i + 1, len(r.completions)):
                prompts.append(tag(r.prompt, labeler) if labeler else r.prompt)
                better.append(r.completions[i])
                worse.append(r.completions[j])
    return (score(prompts, better) - score(prompts, worse)).tolist()


def embedding_table(model: Path, train_records: list[Comparison], held_out: list[Comparison], prior: int) -> dict[str, dict]:
    import torch

    score = SequenceClassifierScore.from_pretrained(str(model))
    counts = Counter(r.labeler for r in train_records if r.labeler)
    table = {}
    for name in sorted({r.labeler for r in held_out if r.labeler}):
        mine = [r for r in held_out if r.labeler == name]
        pooled = torch.tensor(margins(score, mine))
        weight = counts[name] / (counts[name] + prior)
        own = pooled + weight * (torch.tensor(margins(score, mine, name)) - pooled)
        table[name] = {"pooled_accuracy": accuracy(pooled), "own_accuracy": accuracy(own), "train_labels": counts[name]}
    return table


def cell(values: list[float]) -> str:
    mean = statistics.fmean(values)
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{100 * mean:.1f} ± {100 * sd:.1f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", default="recipes/demo.yaml")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--out", type=Path, default=Path("runs/personal-conditioning"))
    args = parser.parse_args()
    recipe = load_recipe(Recipe, args.recipe, [])
    config = recipe.personalize
    args.out.mkdir(parents=True, exist_ok=True)
    train_records = load_feedback(config.feedback)
    held_out = load_feedback(config.eval_feedback)
    tagged = args.out / "tagged_train.jsonl"
    write_tagged(train_records, tagged)

    results: dict[str, list[dict]] = {"heads": [], "embedding": []}
    times: dict[str, list[float]] = {"heads": [], "embedding": []}
    for seed in args.seeds:
        model, wall = train(recipe, "heads", seed, args.out, list(config.feedback))
        results["heads"].append(json.loads((model.parent / "eval.json").read_text())["labelers"])
        times["heads"].append(wall)
        model, wall = train(recipe, "embedding", seed, args.out, [str(tagged)])
        results["embedding"].append(embedding_table(model, train_records, held_out, recipe.reward.personal.prior_labels))
        times["embedding"].append(wall)

    names = sorted(results["heads"][0])
    lines = [
        f"Held-out accuracy (%) on each labeler's own labels, mean ± sd over seeds {', '.join(map(str, args.seeds))}; "
        "pooled: the variant's pooled score, own: the labeler's.", "",
        "| labeler | heads: pooled | heads: own | embedding: pooled | embedding: own |", "|---|---|---|---|---|",
    ]
    for name in names:
        row = [cell([t[name][k] for t in results[v]]) for v in ("heads", "embedding") for k in ("pooled_accuracy", "own_accuracy")]
        lines.append(f"| {name} | " + " | ".join(row) + " |")
    gain = {v: [statistics.fmean(t[n]["own_accuracy"] - t[n]["pooled_accuracy"] for n in names) for t in results[v]] for v in results}
    lines += ["", f"Mean gain of own over pooled: heads {cell(gain['heads'])} points, embedding {cell(gain['embedding'])} points.",
              f"Training time (s): heads {statistics.fmean(times['heads']):.0f}, embedding {statistics.fmean(times['embedding']):.0f}."]
    text = "\n".join(lines) + "\n"
    (args.out / "report.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
