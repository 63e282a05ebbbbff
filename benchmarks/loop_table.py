"""Per round and per seed: the numbers of `rlhf loop` runs, with the mean and spread of the last round.

    for s in 0 1 2; do rlhf loop recipes/demo.yaml loop.seed=$s loop.project_dir=runs/loops/random-s$s; done
    python benchmarks/loop_table.py runs/loops/random-s0 runs/loops/random-s1 runs/loops/random-s2

Reads each project's round-NNN/summary.json (what the loop report is made of).
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path


def main(projects: list[str]) -> None:
    print("| run | round | labels (total) | gold win-rate | RM win-rate | KL | ends with EOS | distinct /100 | fresh accuracy | RM held-out accuracy |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    finals = []
    for project in projects:
        rounds = [json.loads(p.read_text()) for p in sorted(Path(project).glob("round-*/summary.json"))]
        for s in rounds:
            fresh = "" if s["fresh_accuracy"] is None else f"{s['fresh_accuracy']:.1%}"
            print(
                f"| {Path(project).name} | {s['round']} | {s['labels']} ({s['labels_total']}) | {s['win_rate_gold']:.1%} | {s['win_rate_rm']:.1%} | "
                f"{s['kl']:.2f} | {s['eos_fraction']:.0%} | {s.get('distinct_per_100', float('nan')):.0f} | {fresh} | {s['reward_accuracy']:.1%} |"
            )
        if rounds:
            finals.append(rounds[-1])
    if len(finals) > 1:
        for key, name in (("win_rate_gold", "gold win-rate"), ("win_rate_rm", "RM win-rate"), ("kl", "KL")):
            values = [f[key] for f in finals]
            scale = 100 if key != "kl" else 1
            print(f"last round, {name}: {statistics.mean(values) * scale:.1f} ± {statistics.stdev(values) * scale:.1f} (mean ± sd over {len(values)}), each {', '.join(f'{v * scale:.1f}' for v in values)}")


if __name__ == "__main__":
    main(sys.argv[1:])
