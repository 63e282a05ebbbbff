"""Write the demo data set: demonstrations, prompts and feedback of every kind, from a seed.

    python -m rlhf.demo.build --out runs/demo/data [--seed 0]

Files (the formats of rlhf/data.py):

    sft.jsonl                 2000 demonstrations of mixed quality (`corpus.DEMO_MIX`)
    prompts_train.jsonl       every training question, as a prompt
    prompts_eval.jsonl        the held-out questions (`corpus.is_held_out`)
    prefs_train.jsonl         3000 pairs labelled by the simulated labelers
    prefs_eval_gold.jsonl      500 pairs on held-out questions, labelled by gold
    rankings_train.jsonl      1000 rankings of 4 replies by the simulated labelers
    rankings_eval.jsonl        200 rankings of 4 replies on held-out questions, by gold
    ratings_train.jsonl       2000 thumbs up/down by the simulated labelers
    ratings_eval.jsonl         500 thumbs up/down on held-out questions, by gold
    personal_train.jsonl      1220 rankings of 4 replies: 400 by each persona (`gold.PERSONAS`),
                              20 by a newcomer (the "typical" labeler)
    personal_eval.jsonl        450 rankings of 4 replies on held-out questions, 150 by each persona
    redteam.jsonl               64 red-team prompts, "kind": "harmful" (rlhf/demo/redteam.py), for `rlhf cai`

Feedback is given on replies drawn from the demonstration mix, as labelers would judge samples
of the fine-tuned policy. The gold-labelled evaluation pairs and rankings are clear-cut: the gold
scores of two replies ranked next to each other differ by at least `MIN_GOLD_MARGIN` (half a
point, less than one polite phrase is worth), so no evaluation label hinges on a difference
smaller than the labelers' own noise. The personas rank replies of `POLISHED_MIX`, the samples
of a policy that already answers well, where their tastes show. Takes about three seconds.
"""

from __future__ import annotations

import argparse
import random
import statistics
from pathlib import Path

from rlhf.data import write_jsonl
from rlhf.demo.corpus import DEMO_MIX, ReplyMix, format_completion, format_prompt, sample_exchange, sample_reply, split_questions
from rlhf.demo.gold import LABELERS, PERSONAS, THUMBS_UP, gold_breakdown, gold_score
from rlhf.demo.redteam import write_redteam_prompts

DEMONSTRATIONS = 2000
PREFERENCES, PREFERENCES_EVAL = 3000, 500
RANKINGS, RANKINGS_EVAL, RANKING_SIZE = 1000, 200, 4
RATINGS, RATINGS_EVAL = 2000, 500
MIN_GOLD_MARGIN = 0.5
PERSONAL, PERSONAL_EVAL, NEWCOMER = 400, 150, 20
REDTEAM = 64
POLISHED_MIX = ReplyMix(
    body=(0.9, 0.05, 0.05),
    opener=(0.85, 0.05, 0.1),
    closer=(0.85, 0.05, 0.1),
    toxic=(0.97, 0.03, 0.0),
    filler=(0.85, 0.12, 0.03),
    repeated=0.02,
)


def _replies(rng: random.Random, questions: list[tuple[str, str]], k: int, mix: ReplyMix = DEMO_MIX) -> tuple[str, list[str]]:
    """A prompt and `k` distinct completions to it."""
    topic, question = rng.choice(questions)
    completions: list[str] = []
    while len(completions) < k:
        completion = format_completion(sample_reply(rng, topic, mix)[0])
        if completion not in completions:
            completions.append(completion)
    return format_prompt(question), completions


def _gold_ranked(rng: random.Random, questions: list[tuple[str, str]], k: int) -> tuple[str, list[str]]:
    """A prompt and `k` completions best to worst by gold, each clearly better than the next."""
    while True:
        prompt, completions = _replies(rng, questions, k)
        scored = sorted(((gold_score(prompt, c), c) for c in completions), reverse=True)
        if all(a[0] - b[0] >= MIN_GOLD_MARGIN for a, b in zip(scored, scored[1:])):
            return prompt, [c for _, c in scored]


def build(out_dir: str | Path, seed: int = 0) -> dict[str, float]:
    """Write every file of the demo data set to `out_dir`; return summary statistics."""
    out = Path(out_dir)
    rng = random.Random(seed)
    train_questions, eval_questions = split_questions()

    demos = [sample_exchange(rng, DEMO_MIX, train_questions) for _ in range(DEMONSTRATIONS)]
    write_jsonl(out / "sft.jsonl", [{"prompt": d.prompt, "completion": d.completion} for d in demos])
    write_jsonl(out / "prompts_train.jsonl", [{"prompt": format_prompt(q)} for _, q in train_questions])
    write_jsonl(out / "prompts_eval.jsonl", [{"prompt": format_prompt(q)} for _, q in eval_questions])

    prefs, agreements = [], {labeler.name: [] for labeler in LABELERS}
    for _ in range(PREFERENCES):
        prompt, (a, b) = _replies(rng, train_questions, 2)
        labeler = rng.choice(LABELERS)
        chosen, rejected = (a, b) if labeler.prefers(rng, prompt, a, b) else (b, a)
        prefs.append({"prompt": prompt, "chosen": chosen, "rejected": rejected, "labeler": labeler.name})
        agreements[labeler.name].append(gold_score(prompt, chosen) > gold_score(prompt, rejected))
    write_jsonl(out / "prefs_train.jsonl", prefs)
    gold_pairs = [_gold_ranked(rng, eval_questions, 2) for _ in range(PREFERENCES_EVAL)]
    write_jsonl(
        out / "prefs_eval_gold.jsonl",
        [{"prompt": p, "chosen": c, "rejected": r, "labeler": "gold"} for p, (c, r) in gold_pairs],
    )

    rankings = []
    for _ in range(RANKINGS):
        prompt, completions = _replies(rng, train_questions, RANKING_SIZE)
        labeler = rng.choice(LABELERS)
        rankings.append({"prompt": prompt, "completions": labeler.rank(rng, prompt, completions), "labeler": labeler.name})
    write_jsonl(out / "rankings_train.jsonl", rankings)
    write_jsonl(
        out / "rankings_eval.jsonl",
        [
            {"prompt": p, "completions": c, "labeler": "gold"}
            for p, c in (_gold_ranked(rng, eval_questions, RANKING_SIZE) for _ in range(RANKINGS_EVAL))
        ],
    )

    ratings = []
    for _ in range(RATINGS):
        prompt, (completion,) = _replies(rng, train_questions, 1)
        labeler = rng.choice(LABELERS)
        ratings.append({"prompt": prompt, "completion": completion, "label": labeler.rate(rng, prompt, completion), "labeler": labeler.name})
    write_jsonl(out / "ratings_train.jsonl", ratings)
    eval_ratings = []
    for _ in range(RATINGS_EVAL):
        prompt, (completion,) = _replies(rng, eval_questions, 1)
        label = int(gold_score(prompt, completion) >= THUMBS_UP)
        eval_ratings.append({"prompt": prompt, "completion": completion, "label": label, "labeler": "gold"})
    write_jsonl(out / "ratings_eval.jsonl", eval_ratings)

    # A stream of its own, so that the files above do not change with these.
    personal_rng = random.Random(f"personal-{seed}")

    def personal(labeler, questions, n: int) -> list[dict]:
        rankings = []
        for _ in range(n):
            prompt, completions = _replies(personal_rng, questions, RANKING_SIZE, POLISHED_MIX)
            rankings.append({"prompt": prompt, "completions": labeler.rank(personal_rng, prompt, completions), "labeler": labeler.name})
        return rankings

    newcomer = next(labeler for labeler in LABELERS if labeler.name == "typical")
    train = [r for persona in PERSONAS for r in personal(persona, train_questions, PERSONAL)]
    train += [{**r, "labeler": "newcomer"} for r in personal(newcomer, train_questions, NEWCOMER)]
    personal_rng.shuffle(train)
    write_jsonl(out / "personal_train.jsonl", train)
    write_jsonl(out / "personal_eval.jsonl", [r for persona in PERSONAS for r in personal(persona, eval_questions, PERSONAL_EVAL)])
    write_redteam_prompts(out / "redteam.jsonl", REDTEAM, seed)

    demo_scores = [gold_breakdown(d.prompt, d.completion) for d in demos]
    return {
        "demonstrations_best_fraction": statistics.mean(s.best for s in demo_scores),
        "demonstrations_mean_gold": statistics.mean(s.total for s in demo_scores),
        "best_demonstrations_mean_gold": statistics.mean(s.total for s in demo_scores if s.best),
        "labelers_agreement_with_gold": statistics.mean(a for votes in agreements.values() for a in votes),
        **{f"agreement_with_gold_{name}": statistics.mean(votes) for name, votes in agreements.items()},
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="directory to write the data set to")
    parser.add_argument("--seed", type=int, default=0, help="seed of every random draw")
    args = parser.parse_args(argv)
    summary = build(args.out, args.seed)
    print(f"wrote the demo data set to {args.out}")
    for name, value in summary.items():
        print(f"  {name}: {value:.3f}")


if __name__ == "__main__":
    main()
