"""A policy per labeler: one LoRA adapter each on one base, trained by PPO against that labeler's
score of a personal reward model, and measured against the pooled policy by their own utility.

    rlhf personalize recipes/demo.yaml [personalize.seeds=[0,1,2] personalize.labelers=[brief] ...]

1. The personal reward model: the recipe's `reward` section on `personalize.feedback`, with
   `reward.personal` on (`rlhf.reward`). Its eval.json gives each labeler's held-out accuracy,
   the pooled score's against their own.
2. For each seed, LoRA adapters trained by the recipe's `ppo` section: "pooled" against the
   pooled score, and one per labeler against theirs (`ppo.reward.labeler`), each in its own
   process, so an interrupted run continues where it stopped. With `from_pooled` (the default)
   a labeler's adapter trains on the pooled policy, which is also its KL reference: it moves
   from the pool only where the labeler's own score asks, and what the pooled policy learned
   of the shared taste stays. Without it every adapter trains on the SFT model.
3. For each seed, every adapter on one base, picked by name (`load_adapters`), samples
   `samples_per_prompt` completions per held-out prompt (the pooled policy, with `from_pooled`,
   is that base with its adapters off). A labeler's adapter wins a prompt when
   the mean utility of its completions to that labeler (`personalize.oracles`) is above the
   pooled adapter's; the shared gold (`eval.oracle`) of both says what the personal policy gave
   up for it.

Writes report.md and results.json under `personalize.output_dir`.
"""

from __future__ import annotations

import copy
import json
import logging
import statistics
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from rlhf.config import ConfigError, NonNegative, NonNegativeInt, PositiveInt, to_dict
from rlhf.data import load_feedback, load_prompts
from rlhf.encoding import use_chat_template
from rlhf.models import load_causal_lm, load_tokenizer
from rlhf.sampling import sample_texts
from rlhf.scoring import FunctionScore, load_function

log = logging.getLogger(__name__)

POOLED = "pooled"


@dataclass
class PersonalizeConfig:
    feedback: list[str] = field(default_factory=list)
    """Feedback files whose records name their `labeler`: the personal reward model trains on them."""
    eval_feedback: list[str] = field(default_factory=list)
    """Held-out feedback files, also by labeler (empty: a split of `feedback`)."""
    labelers: list[str] = field(default_factory=list)
    """Labelers who get an adapter of their own; empty: every labeler in `oracles`."""
    oracles: dict[str, str] = field(default_factory=dict)
    """Each labeler's own utility, `module:function` (the demo's personas: rlhf.demo.gold:brief, ...); the adapters are judged by it."""
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    """Seeds each adapter trains with."""
    from_pooled: bool = True
    """Train each labeler's adapter on the pooled policy, its KL reference too (false: on the SFT model, as the pooled one)."""
    ppo_steps: NonNegativeInt = 0
    """PPO steps per adapter (0: the ppo section's stop.max_steps)."""
    labeler_steps: NonNegativeInt = 0
    """PPO steps of a labeler's adapter (0: ppo_steps); with `from_pooled` it starts where the pooled one ended."""
    labeler_beta: NonNegative = 0.0
    """KL coefficient of a labeler's adapter to its reference (0: the ppo section's kl.beta); with `from_pooled` a larger one keeps what the pooled policy got right."""
    lr: NonNegative = 0.0
    """Learning rate of the adapters (0: the ppo section's optim.lr); LoRA usually wants a higher one than full fine-tuning."""
    samples_per_prompt: PositiveInt = 4
    """Completions per held-out prompt and policy; a prompt is won on their mean utility."""
    output_dir: str = "runs/personal"
    """Where the reward model, each adapter, report.md and results.json go."""


def labelers_of(config: PersonalizeConfig) -> list[str]:
    return list(config.labelers or config.oracles)


def check_config(recipe) -> None:
    config = recipe.personalize
    if not config.feedback:
        raise ConfigError("personalize.feedback is required: feedback files whose records name their labeler")
    if not config.oracles:
        raise ConfigError("personalize.oracles is required: each labeler's utility as module:function, e.g. {brief: rlhf.demo.gold:brief}")
    missing = [name for name in labelers_of(config) if name not in config.oracles]
    if missing:
        raise ConfigError(f"personalize.oracles: no utility for the labelers {missing}; it has {sorted(config.oracles)}")
    if POOLED in config.oracles:
        raise ConfigError(f"personalize.oracles: {POOLED!r} names the pooled adapter; a labeler needs another name")
    for name, spec in config.oracles.items():
        load_function(spec, f"personalize.oracles.{name}")
    if not recipe.eval.oracle or not recipe.eval.prompts:
        raise ConfigError("eval.oracle and eval.prompts are required: the adapters are compared on the held-out prompts by the shared gold too")


def validate(recipe) -> None:
    """What the feedback files decide (they may be written by an earlier stage, the demo's by
    `rlhf personalize` itself): every labeler to personalise gave labels."""
    check_config(recipe)
    config = recipe.personalize
    counts = Counter(record.labeler for record in load_feedback(config.feedback))
    few = [name for name in labelers_of(config) if counts[name] < recipe.reward.personal.min_labels]
    if few:
        key = "personalize.labelers" if config.labelers else "personalize.oracles"
        raise ConfigError(f"{key}: {few} gave no labels in personalize.feedback (fewer than reward.personal.min_labels={recipe.reward.personal.min_labels}); its labelers are {sorted(n for n in counts if n)}")


def reward_section(recipe, out: Path) -> dict:
    config = copy.deepcopy(recipe.reward)
    config.data.train, config.data.eval = list(recipe.personalize.feedback), list(recipe.personalize.eval_feedback)
    config.personal.enabled, config.output_dir = True, str(out)
    return to_dict(config)


def ppo_section(recipe, labeler: str, reward_model: Path, seed: int, out: Path, base: str = "") -> dict:
    """The recipe's PPO with LoRA against one labeler's score (or the pooled one), on `base`
    (empty: the ppo section's policy); the reference is the policy it starts from."""
    config = copy.deepcopy(recipe.ppo)
    config.lora.enabled = True
    if base:
        config.policy, config.reference = base, ""
    config.reward.kind, config.reward.path = "model", str(reward_model)
    config.reward.labeler = "" if labeler == POOLED else labeler
    if recipe.personalize.ppo_steps:
        config.stop.max_steps = recipe.personalize.ppo_steps
    if labeler != POOLED and recipe.personalize.labeler_steps:
        config.stop.max_steps = recipe.personalize.labeler_steps
    if labeler != POOLED and recipe.personalize.labeler_beta:
        config.kl.beta = recipe.personalize.labeler_beta
    if recipe.personalize.lr:
        config.optim.lr = recipe.personalize.lr
    config.oracle = recipe.personalize.oracles.get(labeler, recipe.eval.oracle)
    config.seed, config.output_dir = seed, str(out)
    return to_dict(config)


def load_adapters(base: str, adapters: dict[str, str | Path], tokenizer, device="cpu"):
    """One base model with every adapter loaded under its name; `model.set_adapter(name)` picks one."""
    from peft import PeftModel

    names = list(adapters)
    model = PeftModel.from_pretrained(load_causal_lm(base, tokenizer), str(adapters[names[0]]), adapter_name=names[0])
    for name in names[1:]:
        model.load_adapter(str(adapters[name]), adapter_name=name)
    return model.to(device).eval()


def paired_difference(a: list[float], b: list[float]) -> tuple[float, float]:
    """Mean of a - b over prompts, and its standard error."""
    diff = [x - y for x, y in zip(a, b)]
    return statistics.fmean(diff), statistics.stdev(diff) / len(diff) ** 0.5 if len(diff) > 1 else 0.0


def evaluate_seed(recipe, base: str | Path, adapters: dict[str, Path], seed: int, out: Path) -> dict[str, dict]:
    """Every labeler's adapter against the pooled policy on the held-out prompts: {labeler: row}.
    `adapters` holds an adapter per labeler on `base`, and one named "pooled", or none when the
    pooled policy is `base` itself."""
    config, ppo = recipe.personalize, recipe.ppo
    setup = {"base": str(base), "adapters": {n: str(a) for n, a in adapters.items()}, "labelers": labelers_of(config),
             "samples_per_prompt": config.samples_per_prompt, "seed": seed}
    if (out / "results.json").exists() and (out / "setup.json").exists() and json.loads((out / "setup.json").read_text()) == setup:
        return json.loads((out / "results.json").read_text())  # evaluated before, the same way
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    tokenizer = load_tokenizer(ppo.policy)
    use_chat_template(tokenizer, ppo.chat_template)
    model = load_adapters(str(base), adapters, tokenizer, device)
    prompts = [r.prompt for r in load_prompts(recipe.eval.prompts)]
    k = config.samples_per_prompt
    repeated = [p for p in prompts for _ in range(k)]
    gold = FunctionScore(recipe.eval.oracle)
    per_prompt = lambda scores: scores.view(len(prompts), k).mean(1).tolist()  # noqa: E731
    completions = {}
    for name in adapters:
        model.set_adapter(name)
        torch.manual_seed(seed)
        completions[name] = sample_texts(model, tokenizer, repeated, recipe.eval.generation, desc=f"sampling {name}")
    if POOLED not in adapters:
        with model.disable_adapter():
            torch.manual_seed(seed)
            completions[POOLED] = sample_texts(model, tokenizer, repeated, recipe.eval.generation, desc=f"sampling {POOLED}")
    rows = {}
    for name in labelers_of(config):
        utility = FunctionScore(config.oracles[name])
        own, pooled = per_prompt(utility(repeated, completions[name])), per_prompt(utility(repeated, completions[POOLED]))
        own_gold, pooled_gold = per_prompt(gold(repeated, completions[name])), per_prompt(gold(repeated, completions[POOLED]))
        wins = sum(a > b for a, b in zip(own, pooled)) + 0.5 * sum(a == b for a, b in zip(own, pooled))
        gold_diff, gold_se = paired_difference(own_gold, pooled_gold)
        rows[name] = {
            "prompts": len(prompts), "win_rate": wins / len(prompts),
            "utility": statistics.fmean(own), "pooled_utility": statistics.fmean(pooled),
            "gold": statistics.fmean(own_gold), "pooled_gold": statistics.fmean(pooled_gold), "gold_diff": gold_diff, "gold_diff_se": gold_se,
        }
    out.mkdir(parents=True, exist_ok=True)
    with (out / "samples.jsonl").open("w", encoding="utf-8") as f:
        for i, prompt in enumerate(repeated):
            f.write(json.dumps({"prompt": prompt, **{name: texts[i] for name, texts in completions.items()}}, ensure_ascii=False) + "\n")
    (out / "results.json").write_text(json.dumps(rows, indent=2) + "\n")
    (out / "setup.json").write_text(json.dumps(setup, indent=2) + "\n")
    return rows


def run(recipe) -> Path:
    """Train the personal reward model and every adapter of every seed, compare, report."""
    from rlhf import compare, sft

    validate(recipe)
    config = recipe.personalize
    root = Path(config.output_dir)
    if not Path(recipe.ppo.policy).exists():
        sft.train(recipe.sft)
    compare.run_one("reward", reward_section(recipe, root / "reward"), root / "reward")
    reward_model = root / "reward" / "model"
    names = [POOLED, *labelers_of(config)]
    runs = [(name, seed) for seed in config.seeds for name in names]  # pooled first: the labelers' adapters may start from it
    pooled_model = lambda seed: root / f"s{seed}" / POOLED / "model"  # noqa: E731
    for name, seed in tqdm(runs, desc="personalize", dynamic_ncols=True):
        out = root / f"s{seed}" / name
        base = str(pooled_model(seed)) if config.from_pooled and name != POOLED else ""
        log.info("personalize: %s, seed %d%s -> %s", name, seed, f", on {base}" if base else "", out)
        compare.run_one("ppo", ppo_section(recipe, name, reward_model, seed, out, base), out)
    rows = {}
    for seed in config.seeds:
        adapters = {n: root / f"s{seed}" / n / "model" / "adapter" for n in (labelers_of(config) if config.from_pooled else names)}
        rows[seed] = evaluate_seed(recipe, pooled_model(seed) if config.from_pooled else recipe.ppo.policy, adapters, seed, root / f"s{seed}" / "eval")
    accuracy = json.loads((root / "reward" / "eval.json").read_text()).get("labelers", {})
    report = root / "report.md"
    report.write_text(render_report(config, accuracy, rows))
    (root / "results.json").write_text(json.dumps({"reward": accuracy, "adapters": {str(s): r for s, r in rows.items()}}, indent=2) + "\n")
    return report


def render_report(config: PersonalizeConfig, accuracy: dict[str, dict], rows: dict[int, dict]) -> str:
    from rlhf import compare

    def cell(values: list[float], fmt: str) -> str:
        mean, sd = compare.mean_sd(values)
        return f"{fmt.format(mean)} ± {fmt.replace('+', '').format(sd)}"

    lines = ["# Personalisation", "", "## The reward model: each labeler's held-out labels", "",
             "Accuracy on each labeler's own held-out comparisons of the pooled score and of the labeler's own (shrunk) score.", "",
             "| labeler | training labels | shrinkage weight | held-out pairs | pooled | own |", "|---|---|---|---|---|---|"]
    for name, entry in accuracy.items():
        own = f"{100 * entry['own_accuracy']:.1f}%" if "own_accuracy" in entry else "—"
        lines.append(f"| {name} | {entry.get('train_labels', 0)} | {entry.get('weight', 0):.2f} | {entry['pairs']} | {100 * entry['pooled_accuracy']:.1f}% | {own} |")
    seeds = sorted(rows)
    lines += ["", "## Each labeler's adapter against the pooled one", "",
              f"Seeds {', '.join(map(str, seeds))}, mean ± sd over seeds. Win-rate: share of held-out prompts where the mean utility, to that "
              f"labeler, of the adapter's {config.samples_per_prompt} completions beats the pooled adapter's (ties half). "
              "Shared gold: the demo's gold score of the same completions.", "",
              "| labeler | win-rate by own utility | own utility: adapter | pooled | shared gold: adapter | pooled | gold difference |",
              "|---|---|---|---|---|---|---|"]
    for name in labelers_of(config):
        r = [rows[s][name] for s in seeds]
        lines.append(
            f"| {name} | {cell([100 * x['win_rate'] for x in r], '{:.1f}%')} | {cell([x['utility'] for x in r], '{:.2f}')} | {cell([x['pooled_utility'] for x in r], '{:.2f}')} "
            f"| {cell([x['gold'] for x in r], '{:.2f}')} | {cell([x['pooled_gold'] for x in r], '{:.2f}')} | {cell([x['gold_diff'] for x in r], '{:+.3f}')} |"
        )
    lines += ["", "Per seed (win-rate; gold difference ± its standard error over prompts):", ""]
    for name in labelers_of(config):
        lines.append(f"- {name}: " + ", ".join(f"seed {s} {100 * rows[s][name]['win_rate']:.1f}%, {rows[s][name]['gold_diff']:+.3f} ± {rows[s][name]['gold_diff_se']:.3f}" for s in seeds))
    return "\n".join(lines) + "\n"
