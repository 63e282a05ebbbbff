"""The `rlhf` command.

    rlhf sft      --config recipes/demo.yaml [section.key=value ...]
    rlhf reward   --config recipes/demo.yaml [section.key=value ...]
    rlhf ppo      --config recipes/demo.yaml [section.key=value ...]
    rlhf grpo     --config recipes/demo.yaml [grpo.algo.estimator=grpo|dr_grpo|rloo|reinforce_pp|reinforce_pp_baseline ...]
    rlhf dpo      --config recipes/demo.yaml [section.key=value ...]
    rlhf eval     --config recipes/demo.yaml [section.key=value ...]
    rlhf score    --reward runs/demo/reward/model --input samples.jsonl --out scored.jsonl
    rlhf generate --model runs/demo/sft/model --prompts prompts.jsonl --out candidates.jsonl --num 4
    rlhf judge    --config recipes/demo.yaml --candidates candidates.jsonl --out ai_prefs.jsonl --task pair|rank|rate
    rlhf judge-agreement --ai ai_prefs.jsonl --human prefs.jsonl [--json agreement.json]   (AI labels against human ones)
    rlhf label    serve | add-labeler | export      (the human feedback web app)
    rlhf pipeline recipes/demo.yaml [section.key=value ...]
    rlhf loop     recipes/demo-loop.yaml [section.key=value ...]   (rounds of labels, reward model, PPO)
    rlhf compare  recipes/demo.yaml [compare.seeds=[0,1,2] ...]     (every algorithm, equal budget, one report)
    rlhf personalize recipes/demo.yaml [personalize.seeds=[0,1,2] ...]  (a LoRA adapter per labeler, against the pooled one)
    rlhf cai      recipes/demo.yaml [cai.prompts=[redteam.jsonl] ...]   (critiques and revisions by a judge, as SFT data)
    rlhf loop     status|continue runs/demo-loop
    rlhf bench    [--size tiny|small] [--precision fp32|bf16] [--new-tokens 32] [--batch 16]
    rlhf demo data --out DIR          rlhf demo base --out DIR          rlhf demo judge --out DIR

`rlhf sft --help` lists every key of the stage with its default, allowed range and meaning.
A bad value or option is an `error: ...` line on stderr and exit code 2, before any work.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from rlhf.config import ConfigError, PositiveInt, UnitInterval, bounds, describe, load_recipe
from rlhf.data import DataError

STAGE_HELP = {
    "sft": "supervised fine-tuning on demonstrations",
    "reward": "train a reward model on pairs, rankings or ratings",
    "ppo": "optimise the policy against a reward source with PPO",
    "grpo": "optimise the policy without a critic: GRPO, Dr. GRPO, RLOO, REINFORCE++ (grpo.algo.estimator)",
    "dpo": "optimise the policy on preferences directly with DPO, IPO or SimPO (no reward model)",
    "eval": "compare policies on held-out prompts and write report.md",
}


def _recipe_class():
    from rlhf.pipeline import Recipe

    return Recipe


def _section_help(section: str) -> str:
    rows = describe(getattr(_recipe_class()(), section), prefix=f"{section}.")
    width = max(len(key) for key, *_ in rows)
    lines = [f"  {key:<{width}}  {doc} (default {default}{', must be ' + allowed if allowed else ''})" for key, default, allowed, doc in rows]
    return "keys (set in the recipe or as section.key=value):\n" + "\n".join(lines)


def _option_type(tp):
    """An argparse `type` for a field's annotation: it reads the value and checks its Range, so
    that `--num 0` is refused as a recipe's `num: 0` would be."""
    limits = bounds(tp)
    kind = tp.__origin__ if limits else tp

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {'an integer' if kind is int else 'a number'}, got {text!r}") from None
        if limits and (problem := limits.violation(value)):
            raise argparse.ArgumentTypeError(problem)
        return value

    return parse


def _add_stage(subparsers, name: str) -> None:
    parser = subparsers.add_parser(
        name, help=STAGE_HELP[name], epilog=_section_help(name), formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", help="recipe YAML file")
    parser.add_argument("overrides", nargs="*", help="section.key=value overrides")


def _add_bench(subparsers) -> None:
    """`rlhf bench`: one option per BenchConfig field, its help the field's docstring."""
    import dataclasses
    import typing

    from rlhf.bench import CHOICES, BenchConfig
    from rlhf.config import field_docs

    bench = subparsers.add_parser("bench", help="time each stage and phase on locally built models; peak memory per mode")
    docs, hints = field_docs(BenchConfig), typing.get_type_hints(BenchConfig, include_extras=True)
    for f in dataclasses.fields(BenchConfig):
        default = f.default_factory() if f.default is dataclasses.MISSING else f.default
        kwargs = {"nargs": "+"} if isinstance(default, list) else {"type": _option_type(hints[f.name])}
        bench.add_argument(f"--{f.name.replace('_', '-')}", default=default, choices=CHOICES.get(f.name), help=f"{docs[f.name]} (default {default})", **kwargs)
    bench.add_argument("--json", help="also write the results to this file")


def build_parser() -> argparse.ArgumentParser:
    import typing

    from rlhf.sampling import SamplingConfig

    parser = argparse.ArgumentParser(prog="rlhf", description="The RLHF loop on one machine.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    subparsers = parser.add_subparsers(dest="command", required=True)
    for name in STAGE_HELP:
        _add_stage(subparsers, name)

    score = subparsers.add_parser("score", help="score a file of {prompt, completion} records")
    score.add_argument("--reward", required=True, help="reward model dir, classifier, or module:function")
    score.add_argument("--kind", default="model", choices=["model", "classifier", "function"])
    score.add_argument("--label", default="", help="classifier label whose logit is the reward")
    score.add_argument("--input", required=True, help="file of {prompt, completion} records")
    score.add_argument("--out", required=True, help="JSONL output: the records with a `score` field")

    generate = subparsers.add_parser("generate", help="sample K candidate completions per prompt for labeling")
    generate.add_argument("--model", required=True, help="model directory or hub id")
    generate.add_argument("--prompts", required=True, nargs="+", help="prompt files ({prompt} records)")
    generate.add_argument("--out", required=True, help="candidates JSONL to write")
    sampling = typing.get_type_hints(SamplingConfig, include_extras=True)
    generate.add_argument("--num", type=_option_type(PositiveInt), default=4, help="completions per prompt")
    generate.add_argument("--temperature", type=_option_type(sampling["temperature"]), default=1.0)
    generate.add_argument("--top-p", type=_option_type(sampling["top_p"]), default=1.0)
    generate.add_argument("--top-k", type=_option_type(sampling["top_k"]), default=0)
    generate.add_argument("--max-new-tokens", type=_option_type(sampling["max_new_tokens"]), default=64)
    generate.add_argument("--seed", type=int, default=0)

    judge = subparsers.add_parser(
        "judge", help="label a candidates file with an AI judge that applies a constitution (RLAIF): pairs, rankings or ratings",
        epilog=_section_help("judge"), formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    judge.add_argument("--config", help="recipe YAML file with a judge section")
    judge.add_argument("--candidates", required=True, nargs="+", help="candidates files (what rlhf generate writes)")
    judge.add_argument("--out", required=True, help="preference JSONL to write, as the labeling app exports it")
    judge.add_argument("--task", default="pair", choices=["pair", "rank", "rate"], help="what the judge is asked (default pair)")
    judge.add_argument("--min-confidence", type=_option_type(UnitInterval), default=0.0,
                       help="keep only labels at least this confident (the probability of the verdict; default 0: all)")
    judge.add_argument("overrides", nargs="*", help="judge.key=value overrides")

    agreement = subparsers.add_parser(
        "judge-agreement", help="agreement of AI labels with human ones, overall, per principle and by confidence (as the labeling app's admin page)"
    )
    agreement.add_argument("--ai", required=True, help="AI labels (what rlhf judge writes)")
    agreement.add_argument("--human", required=True, help="human labels: preference JSONL with labeler names (what rlhf label export writes)")
    agreement.add_argument("--json", help="also write the figures to this file")

    from rlhf.label.cli import add_label_parser

    add_label_parser(subparsers)

    pipeline = subparsers.add_parser("pipeline", help="run SFT, reward model, PPO and evaluation from one recipe")
    pipeline.add_argument("recipe", help="recipe YAML file")
    pipeline.add_argument("overrides", nargs="*", help="section.key=value overrides")

    compare = subparsers.add_parser(
        "compare", help="run PPO, GRPO, RLOO, REINFORCE++ and DPO on one recipe at an equal budget, 3 seeds, one report",
        epilog=_section_help("compare"), formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    compare.add_argument("recipe", help="recipe YAML file")
    compare.add_argument("overrides", nargs="*", help="section.key=value overrides")

    personalize = subparsers.add_parser(
        "personalize", help="a personal reward model and a LoRA policy per labeler, each judged by that labeler against the pooled policy",
        epilog=_section_help("personalize"), formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    personalize.add_argument("recipe", help="recipe YAML file")
    personalize.add_argument("overrides", nargs="*", help="section.key=value overrides")

    cai = subparsers.add_parser(
        "cai", help="constitutional critique and revision: the policy's responses to red-team prompts, revised by a judge, as SFT data",
        epilog=_section_help("cai"), formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    cai.add_argument("recipe", help="recipe YAML file")
    cai.add_argument("overrides", nargs="*", help="section.key=value overrides")

    loop = subparsers.add_parser(
        "loop", help="iterate: sample, label, update the reward model, PPO, evaluate, round after round",
        epilog="rlhf loop RECIPE [section.key=value ...]   run or continue the rounds\n"
               "rlhf loop status PROJECT_DIR               what each round has done, app labels in\n"
               "rlhf loop continue PROJECT_DIR             a round waiting for app labels goes on now\n\n" + _section_help("loop"),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    loop.add_argument("target", help="recipe YAML file, or `status` / `continue`")
    loop.add_argument("rest", nargs="*", help="section.key=value overrides, or the project directory")

    _add_bench(subparsers)

    demo = subparsers.add_parser("demo", help="the embedded demo task")
    demo_sub = demo.add_subparsers(dest="demo_command", required=True)
    data = demo_sub.add_parser("data", help="write the demo data set")
    data.add_argument("--out", required=True)
    data.add_argument("--seed", type=int, default=0)
    base = demo_sub.add_parser("base", help="rebuild the tiny demo base model from scratch")
    base.add_argument("--out", required=True)
    judge_model = demo_sub.add_parser("judge", help="rebuild the demo's judge model (the stand-in for an instruct model) from gold labels")
    judge_model.add_argument("--out", required=True)
    judge_model.add_argument("--seed", type=int, default=0)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S"
    )
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    if args.command == "label":
        from rlhf.label.cli import run as run_label

        sys.exit(run_label(args))
    from rlhf.judge import JudgeError

    try:
        run(args)
    except (ConfigError, DataError, OSError, JudgeError) as exc:  # OSError: a model or file that cannot be read; JudgeError: the judge's endpoint
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)


def run(args: argparse.Namespace) -> None:
    from rlhf import pipeline

    if args.command in STAGE_HELP:
        recipe = load_recipe(_recipe_class(), args.config, args.overrides)
        pipeline.run_stage(recipe, args.command)
    elif args.command == "pipeline":
        report = pipeline.run(load_recipe(_recipe_class(), args.recipe, args.overrides))
        print(f"\nreport: {report}")
    elif args.command == "compare":
        from rlhf import compare

        recipe = load_recipe(_recipe_class(), args.recipe, args.overrides)
        pipeline.prepare(recipe)
        print(f"\ncomparison report: {compare.run(recipe)}")
    elif args.command == "personalize":
        from rlhf import personal

        recipe = load_recipe(_recipe_class(), args.recipe, args.overrides)
        pipeline.prepare(recipe)
        print(f"\npersonalisation report: {personal.run(recipe)}")
    elif args.command == "cai":
        import json

        from rlhf import cai

        recipe = load_recipe(_recipe_class(), args.recipe, args.overrides)
        pipeline.prepare(recipe)
        path = cai.run(recipe.cai)
        summary = json.loads((path.parent / "cai.json").read_text(encoding="utf-8"))
        print(f"\n{summary['prompts']} prompts: {summary['revised']} revised, {summary['unchanged']} unchanged, {summary['failed']} without a critique; "
              f"{summary['step_outcomes']['empty revision']} empty revisions, {summary['step_outcomes']['cut critique'] + summary['step_outcomes']['cut revision']} answers cut at cai.judge.max_tokens. SFT data: {path} (the chains: {path.parent / 'chain.jsonl'})")
    elif args.command == "loop":
        from rlhf import loop

        if args.target in ("status", "continue"):
            if len(args.rest) != 1:
                raise ConfigError(f"rlhf loop {args.target}: give the project directory (loop.project_dir), e.g. rlhf loop {args.target} runs/demo-loop")
            if args.target == "status":
                print(loop.status(args.rest[0]))
            else:
                print(f"asked the loop in {args.rest[0]} to go on with the labels that are in: {loop.ask_to_continue(args.rest[0])}")
        else:
            recipe = load_recipe(_recipe_class(), args.target, args.rest)
            pipeline.prepare(recipe)
            print(f"\nloop report: {loop.run(recipe)}")
    elif args.command == "judge":
        from rlhf.judge import label_candidates

        recipe = load_recipe(_recipe_class(), args.config, args.overrides)
        summary = label_candidates(recipe.judge, args.candidates, args.out, args.task, args.min_confidence)
        bias = summary["position_bias_rate"]
        hit = summary["cache_hit_rate"]
        print(f"wrote {summary['labels']} labels by {summary['labeler']} to {args.out}; "
              f"unparseable answers {summary.get('unparseable answers', 0)}, position-bias rate {'n/a' if bias is None else f'{bias:.1%}'}, "
              f"cache hit rate {'n/a' if hit is None else f'{hit:.1%}'} (details: {args.out}.judge.json)")
    elif args.command == "judge-agreement":
        import json

        from rlhf.label.ai_agreement import compare, format_reports, read_labels

        reports = compare(read_labels(args.ai, ai=True), read_labels(args.human, ai=False))
        print(format_reports(reports, args.ai, args.human), end="")
        if args.json:
            with open(args.json, "w", encoding="utf-8") as f:
                json.dump({"ai": args.ai, "human": args.human, "reports": reports}, f, indent=2)
    elif args.command == "score":
        from rlhf.models import check_model_path
        from rlhf.scoring import RewardSourceConfig, load_function, load_reward_source, score_file

        if args.kind == "function":
            load_function(args.reward, "--reward")
        else:
            check_model_path("--reward", args.reward)
        source = load_reward_source(RewardSourceConfig(kind=args.kind, path=args.reward, label=args.label))
        scores = score_file(source, args.input, args.out)
        print(f"scored {len(scores)} records, mean {sum(scores) / len(scores):.4f}: {args.out}")
    elif args.command == "generate":
        from rlhf.generate import generate
        from rlhf.models import check_generation_room, check_model_path
        from rlhf.sampling import SamplingConfig

        check_model_path("--model", args.model)
        check_generation_room("--max-new-tokens", args.model, args.max_new_tokens)
        sampling = SamplingConfig(args.temperature, args.top_p, args.top_k, args.max_new_tokens)
        n = generate(args.model, args.prompts, args.out, args.num, sampling, args.seed)
        print(f"wrote {args.num} candidates for each of {n} prompts to {args.out}")
    elif args.command == "bench":
        import dataclasses

        from rlhf.bench import BenchConfig, main as bench_main

        bench_main(BenchConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(BenchConfig)}), args.json)
    elif args.command == "demo" and args.demo_command == "data":
        from rlhf.demo.build import build

        build(args.out, args.seed)
        print(f"demo data written to {args.out}")
    elif args.command == "demo" and args.demo_command == "base":
        from rlhf.demo.base import pretrain

        pretrain(args.out)
        print(f"demo base model written to {args.out}")
    elif args.command == "demo" and args.demo_command == "judge":
        from rlhf.demo.judge import build_judge

        build_judge(args.out, args.seed)
        print(f"demo judge model written to {args.out}")
