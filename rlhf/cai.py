"""Constitutional AI, the supervised stage (Bai et al. 2022): red-team prompts, the policy's
responses, a critique by each principle and a revision, as SFT data.

    rlhf cai recipes/demo.yaml [cai.key=value ...]
    rlhf sft --config recipes/demo.yaml sft.data.train=[runs/demo/cai/sft.jsonl]

1. The policy answers every prompt once (`cai.generation`, seeded), rendered as every stage
   renders prompts (`rlhf.encoding`).
2. Each revision step applies one principle of the judge's constitution: the judge critiques the
   current response by it (`rlhf.judge.critique_query`), then rewrites the response to meet the
   critique (`revision_query`). The critiques of every prompt go to the judge in one batch, then
   the revisions. A critique that finds no problem (`rlhf.judge.NO_PROBLEM`) keeps the response
   and asks for no revision; an empty critique or an empty revision keeps it too, and so does a
   critique or a revision cut at `judge.max_tokens` (half a sentence, half a response); each is counted.
3. The principles are applied in turn, in the constitution's order, each of those that apply to
   the prompt's kind (its record's `kind`; every principle where none applies, as `rlhf judge`
   does); `revisions` sets how many steps, going round the principles again after the last.
   Bai et al. draw a principle at random for each step from 16 that are paraphrases of one
   another; a constitution whose principles each stand for a different fault (the demo's, one
   per part of the gold score) would miss one of its 4 principles in 9 prompts of 10 with 4
   random draws, so here each one has its turn.

Writes, under `output_dir`:

    sft.jsonl     {prompt, completion, kind?}: the final revision of every prompt the judge
                  critiqued, changed or not. A response no principle found fault with is what
                  the constitution asks for, and Bai et al. train on the final revision of every
                  red-team prompt; a prompt whose every critique came back empty is left out.
    chain.jsonl   per prompt: prompt, kind, the initial response, each step {principle,
                  critique, revision, response, outcome} and the final completion.
    cai.json      the counts (prompts, revised, unchanged, failed, per step and per principle),
                  the judge's cache hits and, with an `oracle`, its mean score of the initial
                  responses and of the final ones.

The judge's answers are cached on disk (`judge.cache`, by default `output_dir/judge_cache.jsonl`)
as they arrive: a rerun after a failure, or with the same settings, asks only what is missing.
"""

from __future__ import annotations

import json
import logging
import re
import statistics
from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from tqdm.auto import tqdm

from rlhf.config import ConfigError, NonNegativeInt, check_ranges, to_dict
from rlhf.constitution import Constitution, Principle
from rlhf.data import Content, load_prompts, reply_text, write_jsonl
from rlhf.judge import NO_PROBLEM, Judge, JudgeConfig, JudgeError, check_judge, critique_query, revision_query
from rlhf.sampling import SamplingConfig

log = logging.getLogger(__name__)


@dataclass
class CAIConfig:
    policy: str = ""
    """The policy whose responses are critiqued and revised (the SFT model): a local path or a hub id."""
    prompts: list[str] = field(default_factory=list)
    """Red-team prompt files ({prompt, kind?}; the demo's: rlhf.demo.redteam.write_redteam_prompts)."""
    output_dir: str = "runs/cai"
    """Where sft.jsonl, chain.jsonl, cai.json and the judge's cache go."""
    generation: SamplingConfig = field(default_factory=lambda: SamplingConfig(max_new_tokens=48))
    judge: JudgeConfig = field(default_factory=lambda: JudgeConfig(max_tokens=96))
    """The critic and reviser (the keys of the recipe's `judge` section; principles, both_orders and logprobs concern choices, not these free-text answers): max_tokens must hold a whole revised response, and the cache defaults to output_dir/judge_cache.jsonl."""
    revisions: NonNegativeInt = 0
    """Revision steps per prompt, one principle each, in the constitution's order and round again (0: one per principle that applies to the prompt's kind)."""
    oracle: str = ""
    """A score `module:function` of the initial responses and the final ones, reported in cai.json, never used to revise (the demo's gold: rlhf.demo.gold:score); empty: none."""
    seed: int = 0
    """Seed of the policy's sampling."""


def validate(config: CAIConfig) -> Constitution:
    """Refuse, before any model loads, a configuration that cannot work; returns the constitution."""
    from rlhf.models import check_generation_room, check_model_path
    from rlhf.scoring import load_function

    check_ranges(config, "cai")
    if not config.policy:
        raise ConfigError("cai.policy is required: the model whose responses are revised (a local path or a hub id)")
    if not config.prompts:
        raise ConfigError("cai.prompts is required: one or more red-team prompt files ({prompt, kind?} records)")
    check_model_path("cai.policy", config.policy)
    check_generation_room("cai.generation.max_new_tokens", config.policy, config.generation.max_new_tokens)
    if config.oracle:
        load_function(config.oracle, "cai.oracle")
    return check_judge(config.judge, "cai.judge")


def plan(constitution: Constitution, kind: str | None, revisions: int) -> list[Principle]:
    """The principle of each revision step of a prompt of this kind (see the module docstring)."""
    principles = constitution.for_kind(kind) or constitution.principles
    return [principles[i % len(principles)] for i in range(revisions or len(principles))]


def finds_no_problem(critique: str) -> bool:
    """Whether a critique says the response has nothing against the principle: NO_PROBLEM, or
    "no problem" alone, whatever its case, quotes and punctuation."""
    return critique.strip() == NO_PROBLEM or re.fullmatch(r"\W*no problems?\W*", critique, re.IGNORECASE) is not None


def as_completion(text: str, initial: str) -> str:
    """A reviser's answer as a completion written as the policy writes its own: the whitespace the
    policy's initial response opens with (the demo's leading space after "Assistant:"), then the text."""
    return initial[: len(initial) - len(initial.lstrip())] + text.strip()


def sample_responses(config: CAIConfig, prompts: list) -> tuple[list, list[str]]:
    """(the prompt records that fit the policy, one sampled response to each)."""
    from rlhf.encoding import encode_prompts
    from rlhf.models import context_length, load_causal_lm, load_tokenizer
    from rlhf.sampling import sample_texts

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    tokenizer = load_tokenizer(config.policy)
    policy = load_causal_lm(config.policy, tokenizer).to(device)
    room = context_length(policy.config) - config.generation.max_new_tokens
    prompts, _ = encode_prompts(tokenizer, prompts, room, skip_invalid=False)
    torch.manual_seed(config.seed)
    responses = sample_texts(policy, tokenizer, [p.prompt for p in prompts], config.generation, desc="responses")
    del policy
    return prompts, responses


OUTCOMES = ("revised", "same response", "no problem", "empty critique", "cut critique", "empty revision", "cut revision")
"""What a step did: the response revised; a revision identical to it; a critique that found no
problem; an empty critique; a critique cut at judge.max_tokens (half a sentence, not read); an
empty revision; a revision cut at judge.max_tokens, not whole (the last six keep the response)."""


def revise(judge: Judge, constitution: Constitution, items: list[tuple[Content, str | None, str]], revisions: int = 0) -> tuple[list[dict], Counter]:
    """Critique and revise each (prompt, kind, response): its chain record (see the module
    docstring), and how many steps of each principle had each outcome, {(principle, outcome): n}.
    One Judge.ask for the critiques of a step, one for its revisions."""
    chains = [{"prompt": prompt, "kind": kind, "initial": response, "steps": [], "completion": response} for prompt, kind, response in items]
    plans = [plan(constitution, kind, revisions) for _, kind, _ in items]
    counts: Counter = Counter()
    steps = max(map(len, plans), default=0)
    bar = tqdm(total=2 * steps, desc="cai", dynamic_ncols=True, disable=steps == 0)
    for step in range(steps):
        rows = [i for i, p in enumerate(plans) if step < len(p)]
        bar.set_postfix_str(f"step {step + 1}/{steps}: critiques")
        critiques = judge.ask([critique_query(chains[i]["prompt"], chains[i]["completion"], plans[i][step]) for i in rows])
        bar.update(1)
        asked = []
        for i, reply in zip(rows, critiques):
            critique = reply.text.strip()
            entry = {"principle": plans[i][step].name, "critique": critique, "revision": None, "response": chains[i]["completion"]}
            chains[i]["steps"].append(entry)
            if not critique:
                entry["outcome"] = "empty critique"
            elif reply.cut:
                entry["outcome"] = "cut critique"
            elif finds_no_problem(critique):
                entry["outcome"] = "no problem"
            else:
                asked.append(i)
        bar.set_postfix_str(f"step {step + 1}/{steps}: revisions")
        queries = [revision_query(chains[i]["prompt"], chains[i]["completion"], plans[i][step], chains[i]["steps"][-1]["critique"]) for i in asked]
        for i, reply in zip(asked, judge.ask(queries)):
            entry, revision = chains[i]["steps"][-1], reply.text.strip()
            entry["revision"] = revision
            if not revision:
                entry["outcome"] = "empty revision"
                continue
            if reply.cut:  # half a response is no revision of it: raise judge.max_tokens
                entry["outcome"] = "cut revision"
                continue
            revised = as_completion(revision, chains[i]["initial"])
            if reply_text(revised).strip() == reply_text(chains[i]["completion"]).strip():
                entry["outcome"] = "same response"
                continue
            entry["outcome"] = "revised"
            entry["response"] = chains[i]["completion"] = revised
        bar.update(1)
        counts.update((chains[i]["steps"][-1]["principle"], chains[i]["steps"][-1]["outcome"]) for i in rows)
    bar.close()
    return chains, counts


def run(config: CAIConfig, judge: Judge | None = None) -> Path:
    """Sample, critique and revise; write sft.jsonl, chain.jsonl and cai.json; returns sft.jsonl's path."""
    constitution = validate(config)
    out = Path(config.output_dir)
    judge_config = replace(config.judge, cache=config.judge.cache or str(out / "judge_cache.jsonl"))
    prompts = load_prompts(config.prompts)
    prompts, responses = sample_responses(config, prompts)
    log.info("cai: %d responses of %s to critique and revise by %s", len(responses), config.policy, constitution.source)
    judge = judge or Judge(judge_config)
    chains, counts = revise(judge, constitution, [(p.prompt, p.kind, r) for p, r in zip(prompts, responses)], config.revisions)

    records, outcomes = [], Counter()
    for chain in chains:
        judged = any(s["outcome"] != "empty critique" for s in chain["steps"])
        outcome = "failed" if not judged else "revised" if chain["completion"] != chain["initial"] else "unchanged"
        outcomes[outcome] += 1
        if judged:
            records.append({"prompt": chain["prompt"], "completion": chain["completion"]} | ({"kind": chain["kind"]} if chain["kind"] else {}))
    if not records:
        raise JudgeError(f"cai: the judge {judge_config.labeler} gave an empty critique of every one of the {len(chains)} responses; nothing to write")
    write_jsonl(out / "sft.jsonl", records)
    write_jsonl(out / "chain.jsonl", chains)

    principles = list(dict.fromkeys(name for name, _ in counts))
    summary = {
        "prompts": len(chains), **{k: outcomes[k] for k in ("revised", "unchanged", "failed")}, "sft_records": len(records),
        "steps": sum(counts.values()),
        "step_outcomes": {o: sum(n for (_, what), n in counts.items() if what == o) for o in OUTCOMES},
        "by_principle": {name: {o: counts[name, o] for o in OUTCOMES if counts[name, o]} for name in principles},
        "judge": judge_config.labeler, "constitution": constitution.source,
        "judge_cache": {"hits": judge.cache.hits, "misses": judge.cache.misses, "hit_rate": judge.cache.hit_rate},
        "config": to_dict(config),
    }
    if config.oracle:
        summary["oracle"] = oracle_scores(config.oracle, chains)
    (out / "cai.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    log.info(
        "cai: %d prompts, %d revised, %d unchanged, %d failed; %d empty critiques, %d empty revisions, %d critiques and %d revisions cut at judge.max_tokens; %s",
        summary["prompts"], summary["revised"], summary["unchanged"], summary["failed"], summary["step_outcomes"]["empty critique"],
        summary["step_outcomes"]["empty revision"], summary["step_outcomes"]["cut critique"], summary["step_outcomes"]["cut revision"], out,
    )
    return out / "sft.jsonl"


def oracle_scores(spec: str, chains: list[dict]) -> dict:
    """The oracle's mean score of the initial responses and of the final ones, over every prompt
    and over the revised ones."""
    from rlhf.scoring import FunctionScore

    oracle = FunctionScore(spec)
    prompts = [c["prompt"] for c in chains]
    initial = oracle(prompts, [c["initial"] for c in chains]).tolist()
    final = oracle(prompts, [c["completion"] for c in chains]).tolist()
    changed = [i for i, c in enumerate(chains) if c["completion"] != c["initial"]]
    mean = lambda xs: statistics.mean(xs) if xs else None  # noqa: E731
    return {
        "spec": spec, "initial_mean": mean(initial), "final_mean": mean(final),
        "revised_initial_mean": mean([initial[i] for i in changed]), "revised_final_mean": mean([final[i] for i in changed]),
    }
