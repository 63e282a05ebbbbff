"""`rlhf cai` on the demo's red-team prompts: the demo's judge against the gold critic, over seeds.

    python benchmarks/cai_demo.py [--judge rlhf/demo/judge_model] [--seeds 0 1 2] [--workdir runs/cai-demo]

Each seed samples the SFT policy's responses to the 64 red-team prompts (runs/demo/data/redteam.jsonl,
`cai.seed`) and has them critiqued and revised, principle by principle, twice: by the demo's
judge model (`cai.judge`, a stand-in for an instruct model) and by the gold critic and reviser
(rlhf/demo/reviser.py) answering the same questions, what a judge that follows the constitution
perfectly would say. Both runs read the same responses. Prints, per judge, how many responses
were revised and the gold score of the responses before and after (`cai.oracle`), mean and sd
over the seeds; writes summary.json in the workdir.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from rlhf import cai, pipeline  # noqa: E402
from rlhf.config import load_recipe  # noqa: E402
from rlhf.demo.reviser import gold_critique, gold_revision  # noqa: E402
from rlhf.judge import Judge, Reply  # noqa: E402
from rlhf.pipeline import Recipe  # noqa: E402

QUESTION = re.compile(r"\n- (?P<principle>\w+): .*?\n\nConversation:\n(?P<conversation>.*?)\n\nResponse:\n(?P<response>.*?)\n\n", re.S)


class GoldCritic:
    """A judge backend answering critique and revision questions as the gold critic and reviser do."""

    name = "gold-critic"

    def settings(self) -> dict:
        return {"gold": True}

    def answer(self, queries, done) -> None:
        for i, query in enumerate(queries):
            text = query.messages[-1]["content"]
            found = QUESTION.search(text)
            prompt, completion = found["conversation"] + "\nAssistant:", " " + found["response"]
            if text.startswith("Critique"):
                done(i, Reply(gold_critique(prompt, completion, found["principle"])))
            else:
                done(i, Reply(gold_revision(prompt, completion, found["principle"]).strip()))


def mean_sd(values: list[float], digits: int = 3) -> str:
    mean = f"{statistics.mean(values):.{digits}f}"
    return f"{mean} ± {statistics.stdev(values):.{digits}f}" if len(values) > 1 else mean


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--judge", default=str(ROOT / "rlhf" / "demo" / "judge_model"))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--workdir", default=str(ROOT / "runs" / "cai-demo"))
    args = parser.parse_args()
    recipe = load_recipe(Recipe, ROOT / "recipes" / "demo.yaml", [f"cai.judge.model={args.judge}"])
    pipeline.prepare(recipe)
    work = Path(args.workdir)
    rows: dict[str, list[dict]] = {"demo judge": [], "gold critic": []}
    for seed in args.seeds:
        for name, backend in (("demo judge", None), ("gold critic", GoldCritic())):
            out = work / f"seed{seed}" / name.replace(" ", "_")
            config = replace(recipe.cai, seed=seed, output_dir=str(out), judge=replace(recipe.cai.judge, cache=str(out / "judge_cache.jsonl")))
            judge = Judge(config.judge, backend) if backend else None
            cai.run(config, judge=judge)
            summary = json.loads((out / "cai.json").read_text(encoding="utf-8"))
            rows[name].append({"seed": seed, "revised": summary["revised"], "prompts": summary["prompts"], **summary["oracle"]})
    print(f"\nrlhf cai on {rows['demo judge'][0]['prompts']} red-team prompts, seeds {args.seeds} (mean ± sd over seeds)")
    print("| judge | responses revised | gold before | gold after |")
    print("|---|---|---|---|")
    for name, runs in rows.items():
        print(f"| {name} | {mean_sd([r['revised'] for r in runs], 1)} | {mean_sd([r['initial_mean'] for r in runs])} | {mean_sd([r['final_mean'] for r in runs])} |")
    (work / "summary.json").write_text(json.dumps(rows, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
