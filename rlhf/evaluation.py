"""Compare policies on held-out prompts and write `report.md` with PNG plots.

    rlhf eval --config recipes/demo.yaml

For the reference and each policy: mean reward-model score, gold score and win-rate when an
oracle is configured, win-rate against the reference by the reward model, KL to the reference,
response length, the fraction of responses that end with EOS (any of the policy's stop
tokens: `rlhf.models.stop_token_ids`), and how diverse the responses are. A "Warnings" section
says in words which policies show signs of collapse or over-optimisation (`rlhf.diagnostics`):
few distinct responses, a mean score above the reward model's held-out band, a reward-model
win-rate far above the gold one. The plots show a PPO run's score, KL, entropy and value loss
against steps, and score histograms before and after.
"""

from __future__ import annotations

import html
import json
import logging
import random
from dataclasses import dataclass, field
from pathlib import Path

import torch

from rlhf import diagnostics
from rlhf.config import ConfigError, NonNegativeInt, PositiveInt, check_ranges
from rlhf.data import Content, as_text, load_prompts
from rlhf.encoding import check_chat_template, encode_prompts, pad, use_chat_template
from rlhf.models import check_generation_room, check_model_path, context_length, load_causal_lm, load_tokenizer, stop_token_ids
from rlhf.sampling import SamplingConfig, response_logprobs, response_mask, sample_with_logprobs
from rlhf.scoring import FunctionScore, RewardSourceConfig, check_reward_path, check_reward_source, load_function, load_reward_source
from rlhf.tracking import read_metrics

log = logging.getLogger(__name__)


@dataclass
class EvalConfig:
    reference: str = ""
    """The policy everything is compared with (usually the SFT model)."""
    policies: list[str] = field(default_factory=list)
    """Policies to evaluate against the reference (e.g. the PPO model)."""
    prompts: list[str] = field(default_factory=list)
    """Held-out prompt files ({prompt}: a string or a list of messages)."""
    skip_invalid: bool = False
    """Skip malformed prompts and prompts too long for the model (and report how many) instead of stopping at the first."""
    num_prompts: NonNegativeInt = 0
    """Evaluate on this many prompts (0: all)."""
    reward: RewardSourceConfig = field(default_factory=RewardSourceConfig)
    oracle: str = ""
    """Gold scorer `module:function` (e.g. the demo's gold labeler); empty: none."""
    generation: SamplingConfig = field(default_factory=SamplingConfig)
    chat_template: str = "auto"
    """How conversations (lists of messages) become tokens: auto (the tokenizer's chat template, or plain "User: ..." / "Assistant: ..." turns when it has none), none (always those plain turns), or the path of a Jinja chat template. String prompts are used as written."""
    runs: list[str] = field(default_factory=list)
    """PPO run directories whose metrics.jsonl are plotted against steps."""
    output_dir: str = "runs/eval"
    """Where report.md, results.json, samples.jsonl and the plots go."""
    batch_size: PositiveInt = 32
    """Prompts per sampling batch."""
    seed: int = 0
    """Seed for prompt choice and sampling."""


@dataclass
class PolicySamples:
    name: str
    completions: list[str]
    scores: torch.Tensor  # (N,) reward-model scores
    gold: torch.Tensor | None  # (N,) oracle scores
    kl: torch.Tensor  # (N,) sum over tokens of log pi - log pi_ref on the policy's own samples
    lengths: torch.Tensor  # (N,) response tokens up to and including the first stop token
    ended: torch.Tensor  # (N,) emitted a stop token (EOS, end of turn)


def win_rate(a: torch.Tensor, b: torch.Tensor) -> dict[str, float]:
    """Share of prompts where `a` beats `b` (ties count half), with the win/tie/loss counts."""
    wins, ties = (a > b).sum().item(), (a == b).sum().item()
    n = len(a)
    return {"win_rate": (wins + 0.5 * ties) / n, "wins": wins / n, "ties": ties / n, "losses": (n - wins - ties) / n}


def sample_policy(path: str, reference, tokenizer, prompts: list[list[int]], config: EvalConfig, device) -> tuple[list[str], torch.Tensor, torch.Tensor, torch.Tensor]:
    """Completions, KL to the reference, lengths and EOS flags of one policy on the prompts."""
    policy = load_causal_lm(path, tokenizer).to(device).eval()
    stop_ids = stop_token_ids(tokenizer, policy)
    temperature = config.generation.temperature or 1.0
    completions, kls, lengths, ended = [], [], [], []
    torch.manual_seed(config.seed)
    for i in range(0, len(prompts), config.batch_size):
        batch = prompts[i : i + config.batch_size]
        samples = sample_with_logprobs(policy, batch, tokenizer.pad_token_id, stop_ids, config.generation)
        responses, done, logprobs = samples.responses, samples.ended, samples.logprobs  # log-probs at the temperature, 0 after the stop
        mask = response_mask(responses, stop_ids)
        query, query_mask = pad(batch, tokenizer.pad_token_id, side="left")
        ref_logprobs = response_logprobs(reference, query, query_mask, responses, mask, temperature)
        kls.append(((logprobs - ref_logprobs) * mask).sum(-1))
        lengths.append(mask.sum(-1))
        ended.append(done)
        completions += tokenizer.batch_decode(responses * mask + tokenizer.pad_token_id * (1 - mask), skip_special_tokens=True)
    return completions, torch.cat(kls), torch.cat(lengths).float(), torch.cat(ended)


def check_config(config: EvalConfig, num_processes: int = 1) -> None:
    """What the recipe alone decides: ranges, required keys, a reward source and an oracle that
    can load."""
    check_ranges(config, "eval")
    if not config.reference or not config.prompts:
        raise ConfigError("eval.reference and eval.prompts are required")
    if config.reward.reference:
        raise ConfigError("eval.reward.reference: reference responses are for the RL stages' judge; eval compares the policies with eval.reference")
    if config.reward.path:
        check_reward_source(config.reward, "eval.reward")
    if config.oracle:
        load_function(config.oracle, "eval.oracle")


def validate(config: EvalConfig) -> None:
    """What can be checked before loading prompts or a model: the recipe, the policies' paths
    and room for a prompt beside `max_new_tokens` in their contexts, the reward model's path,
    and the runs to plot."""
    check_config(config)
    policies = [("eval.reference", config.reference)] + [(f"eval.policies[{i}]", p) for i, p in enumerate(config.policies)]
    for key, name in policies:
        check_model_path(key, name)
        check_generation_room("eval.generation.max_new_tokens", name, config.generation.max_new_tokens)
    check_chat_template(config.chat_template, "eval.chat_template")
    if config.reward.path:
        check_reward_path(config.reward, "eval.reward")
    for i, run in enumerate(config.runs):
        if not (Path(run).is_file() or (Path(run) / "metrics.jsonl").is_file()):
            raise ConfigError(f"eval.runs[{i}]: no metrics.jsonl at {run} (a PPO run directory or its metrics file)")


def evaluate(config: EvalConfig) -> Path:
    """Sample every policy on the held-out prompts, score, compare, and write the report."""
    validate(config)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    out = Path(config.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    records = list(load_prompts(config.prompts, config.skip_invalid))
    if config.num_prompts and config.num_prompts < len(records):
        records = random.Random(config.seed).sample(records, config.num_prompts)
    tokenizer = load_tokenizer(config.reference)
    use_chat_template(tokenizer, config.chat_template)
    reference = load_causal_lm(config.reference, tokenizer).to(device).eval()
    max_prompt = context_length(reference.config) - config.generation.max_new_tokens
    records, prompts = encode_prompts(tokenizer, records, max_prompt, config.skip_invalid)
    texts = [r.prompt for r in records]
    reward_source = load_reward_source(config.reward, device) if config.reward.path else None
    oracle = FunctionScore(config.oracle) if config.oracle else None

    results: list[PolicySamples] = []
    for name in [config.reference, *config.policies]:
        log.info("eval: sampling %s on %d prompts", name, len(prompts))
        completions, kl, lengths, ended = sample_policy(name, reference, tokenizer, prompts, config, device)
        scores = reward_source(texts, completions).cpu() if reward_source else torch.zeros(len(texts))
        gold = oracle(texts, completions) if oracle else None
        results.append(PolicySamples(name, completions, scores, gold, kl.cpu(), lengths.cpu(), ended.cpu()))

    band = getattr(reward_source, "score_band", None)  # a trained reward model's held-out (p5, p95)
    summary = summarize(results, has_reward=reward_source is not None, band=band)
    (out / "results.json").write_text(json.dumps(summary, indent=2) + "\n")
    with (out / "samples.jsonl").open("w", encoding="utf-8") as f:
        for i, prompt in enumerate(texts):
            row = {"prompt": prompt}
            for r in results:
                row[r.name] = {"completion": r.completions[i], "score": r.scores[i].item(), **({"gold": r.gold[i].item()} if r.gold is not None else {})}
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    plots = plot_runs(config.runs, out) + plot_histograms(results, out)
    report = out / "report.md"
    report.write_text(render_report(summary, plots, texts, results))
    log.info("eval: report written to %s", report)
    return report


def summarize(results: list[PolicySamples], has_reward: bool, band: tuple[float, float] | None = None) -> list[dict]:
    """A row per policy, the reference first; its `warnings` are the signs of collapse or
    over-optimisation its numbers show, given the reward model's held-out score `band`."""
    reference = results[0]
    rows = []
    for r in results:
        row = {
            "policy": r.name,
            "prompts": len(r.completions),
            "kl": r.kl.mean().item(),
            "length": r.lengths.mean().item(),
            "eos_fraction": r.ended.float().mean().item(),
            **diagnostics.diversity(r.completions),
        }
        if has_reward:
            row["score"] = r.scores.mean().item()
            row["win_rate_rm"] = win_rate(r.scores, reference.scores)["win_rate"]
        if r.gold is not None:
            gold = win_rate(r.gold, reference.gold)
            row.update({"gold": r.gold.mean().item(), "win_rate_gold": gold["win_rate"], "wins_gold": gold["wins"], "ties_gold": gold["ties"], "losses_gold": gold["losses"]})
        gold_gap = row["win_rate_rm"] - row["win_rate_gold"] if "win_rate_rm" in row and "win_rate_gold" in row else None
        row["warnings"] = diagnostics.warnings(row, band, gold_gap)
        rows.append(row)
    return rows


def plot_runs(runs: list[str], out: Path) -> list[str]:
    """Training curves of PPO runs: score, KL, entropy and value loss against steps."""
    if not runs:
        return []
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("score/mean", "mean score"), ("kl/sequence", "KL to reference (per sequence)"), ("policy/entropy", "policy entropy"), ("loss/value", "value loss")]
    fig, axes = plt.subplots(2, 2, figsize=(10, 7))
    for run in runs:
        metrics = read_metrics(run)
        for ax, (key, title) in zip(axes.flat, panels):
            points = [(m["step"], m[key]) for m in metrics if key in m]
            if points:
                ax.plot(*zip(*points), label=Path(run).name)
            ax.set_title(title)
            ax.set_xlabel("PPO step")
            ax.grid(alpha=0.3)
    axes.flat[0].legend()
    fig.tight_layout()
    fig.savefig(out / "training.png", dpi=110)
    plt.close(fig)
    return ["training.png"]


def plot_histograms(results: list[PolicySamples], out: Path) -> list[str]:
    """Score histograms of the reference (before) and each policy (after)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kinds = [("scores", "reward-model score")] + ([("gold", "gold score")] if results[0].gold is not None else [])
    fig, axes = plt.subplots(1, len(kinds), figsize=(5.5 * len(kinds), 4), squeeze=False)
    for ax, (attr, title) in zip(axes[0], kinds):
        values = [getattr(r, attr).numpy() for r in results]
        low, high = min(v.min() for v in values), max(v.max() for v in values)
        bins = torch.linspace(float(low), float(high) + 1e-6, 25).numpy()
        for r, v in zip(results, values):
            ax.hist(v, bins=bins, alpha=0.55, label=f"{Path(r.name).parent.name or r.name}/{Path(r.name).name}")
        ax.set_title(title)
        ax.legend()
    fig.tight_layout()
    fig.savefig(out / "scores.png", dpi=110)
    plt.close(fig)
    return ["scores.png"]


def _cell(text: str) -> str:
    """Untrusted model output made inert in a Markdown table cell."""
    return html.escape(text.strip()).replace("|", "&#124;").replace("\n", "<br>").replace("`", "&#96;") or "(empty)"


def render_report(summary: list[dict], plots: list[str], prompts: list[Content], results: list[PolicySamples], examples: int = 5) -> str:
    columns = [("policy", "policy", "{}"), ("score", "RM score", "{:.3f}"), ("win_rate_rm", "win-rate vs ref (RM)", "{:.1%}"),
               ("gold", "gold score", "{:.3f}"), ("win_rate_gold", "win-rate vs ref (gold)", "{:.1%}"),
               ("wins_gold", "wins / ties / losses (gold)", None), ("kl", "KL to ref", "{:.2f}"),
               ("distinct_per_100", "distinct /100", "{:.0f}"), ("top_share", "top share", "{:.0%}"), ("distinct_2", "distinct-2", "{:.2f}"),
               ("length", "length", "{:.1f}"), ("eos_fraction", "ends with EOS", "{:.1%}")]
    columns = [c for c in columns if any(c[0] in row for row in summary)]
    lines = ["# Evaluation report", "", f"{summary[0]['prompts']} held-out prompts; the first row is the reference.", ""]
    lines.append("| " + " | ".join(title for _, title, _ in columns) + " |")
    lines.append("|" + "---|" * len(columns))
    for row in summary:
        cells = []
        for key, _, fmt in columns:
            if key == "wins_gold":
                cells.append(f"{row['wins_gold']:.0%} / {row['ties_gold']:.0%} / {row['losses_gold']:.0%}")
            else:
                cells.append(fmt.format(row[key]))
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "## Warnings", ""]
    lines += [f"- `{Path(row['policy']).as_posix()}`: {sentence}" for row in summary for sentence in row["warnings"]]
    if not any(row["warnings"] for row in summary):
        lines.append("No collapse or over-optimisation signs.")
    lines += [""] + [f"![{p}]({p})" for p in plots]
    lines += ["", "## Examples", "", "| prompt | " + " | ".join(Path(r.name).as_posix() for r in results) + " |", "|" + "---|" * (len(results) + 1)]
    for i in range(min(examples, len(prompts))):
        lines.append(f"| {_cell(as_text(prompts[i]))} | " + " | ".join(f"{_cell(r.completions[i])} ({r.scores[i]:.2f})" for r in results) + " |")
    return "\n".join(lines) + "\n"
