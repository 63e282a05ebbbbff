"""The iterated loop (InstructGPT, Llama 2): rounds of sampling, feedback, reward model and PPO.

    rlhf loop recipes/demo-loop.yaml [section.key=value ...]
    rlhf loop status runs/demo-loop           what each round has done; app labels in and wanted
    rlhf loop continue runs/demo-loop         a round waiting for app labels goes on with those in

Each round, in `loop.project_dir/round-NNN/`:

    pool.jsonl       K candidates for each of the round's prompts, from the round's policy
                     (half from the previous policy with `from_previous`)
    selected.jsonl   the items to label: at random, or those the reward model is least sure of
    feedback.jsonl   one label per item, with its labeler (a labeler function, or people in a
                     running `rlhf label serve`); built in feedback.partial.jsonl, renamed when done
    reward/          the reward model trained on every round's feedback so far
    ppo/             PPO from the round's policy against it; the reference stays the SFT model
    eval/            the round's policy and the earlier rounds' against the reference
    summary.json     the round's numbers, the rows of `report.md` and `loop.png`

Every step skips what its output shows done and resumes what it started (the reward model and
PPO from their checkpoints, the labels from the partial file), so a killed loop started again
continues the round, with no label lost or counted twice.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import os
import random
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from rlhf.config import ConfigError, NonNegativeInt, Positive, PositiveInt, UnitInterval, check_ranges
from rlhf.data import Content, load_candidates, load_feedback, load_prompts, write_jsonl
from rlhf.judge import JudgeConfig

log = logging.getLogger(__name__)


@dataclass
class FeedbackConfig:
    labeler: str = ""
    """A labeler function `module:function`, called as f(prompt, completions, rng) -> (completions best first, labeler name): simulated people, or an AI judge (the demo's: rlhf.demo.gold:simulated_ranking)."""
    app_db: str = ""
    """The SQLite file of a running `rlhf label serve`: the round's items are queued there for people."""
    app_share: UnitInterval = 1.0
    """With both a labeler function and the app, the share of each round's items that go to the app."""
    min_answers: NonNegativeInt = 0
    """App: go on once this many of the round's app items are answered (0: all of them); `rlhf loop continue` goes on sooner."""
    poll_seconds: Positive = 5.0
    """App: seconds between looks at the labeling database."""
    judge: JudgeConfig = field(default_factory=JudgeConfig)
    """An AI labeler in place of the labeler function: the judge ranks each item by its constitution (set judge.model; the keys are those of the recipe's `judge` section; its cache defaults to the round's judge_cache.jsonl)."""


@dataclass
class SelectionConfig:
    strategy: Literal["random", "active"] = "random"
    """random, or active: the items whose order an ensemble of reward heads disagrees on most (random in a round with no reward model yet)."""
    pool: Positive = 1.0
    """Prompts sampled per item labelled: the pool the choice is made from (active needs more than 1)."""
    members: PositiveInt = 8
    """Active: bootstrap heads in the ensemble."""


@dataclass
class LoopConfig:
    project_dir: str = "runs/loop"
    """Where the rounds, the report and the plot go."""
    labels_per_round: list[int] = field(default_factory=lambda: [400, 300, 300])
    """Items labelled in each round (one ranking of `candidates` completions each); its length is the number of rounds."""
    prompts: list[str] = field(default_factory=list)
    """Prompt files the rounds' candidates are sampled for."""
    candidates: PositiveInt = 4
    """Completions per prompt, ranked by one labeler (2: pairs)."""
    temperature: Positive = 1.0
    """Sampling temperature of the candidates (1, as `rlhf generate`: the policy's own distribution, broader than PPO's sampling); the rest of the sampling settings are ppo.generation's."""
    from_previous: bool = False
    """Sample half of each prompt's candidates from the previous round's policy (the reference in the first round)."""
    reference: str = ""
    """The SFT model: PPO's reference in every round, and the evaluation's (empty: ppo.policy)."""
    policy: str = ""
    """The first round's policy (empty: the reference)."""
    reward: str = ""
    """A reward model for the first round's active choice and warm start (empty: none)."""
    initial_feedback: list[str] = field(default_factory=list)
    """Feedback files the first reward model trains on beside the rounds' labels (they count towards the labels used)."""
    reward_update: Literal["warm", "retrain"] = "retrain"
    """Each round's reward model: retrain from reward.model on all feedback so far, or warm-start from the last round's."""
    ppo_steps: PositiveInt = 15
    """PPO steps in each round (ppo.stop.max_steps of the round)."""
    adapters: list[str] = field(default_factory=list)
    """Labelers who get a policy of their own: each round the reward model knows who judged (reward.personal), and each of them gets a LoRA adapter on the round's policy, trained by PPO against their score (round-N/adapters/NAME)."""
    feedback: FeedbackConfig = field(default_factory=FeedbackConfig)
    selection: SelectionConfig = field(default_factory=SelectionConfig)
    seed: int = 0
    """Seed of the rounds' sampling, choice, labels, reward model and PPO."""


def round_dir(config: LoopConfig, index: int) -> Path:
    return Path(config.project_dir) / f"round-{index:03d}"


def check_config(config: LoopConfig, num_processes: int = 1) -> None:
    check_ranges(config, "loop")
    if not config.labels_per_round or any(n < 1 for n in config.labels_per_round):
        raise ConfigError(f"loop.labels_per_round: must be a list of whole numbers >= 1, one per round, got {config.labels_per_round}")
    if not config.prompts:
        raise ConfigError("loop.prompts is required: the prompt files candidates are sampled for")
    if config.candidates < 2:
        raise ConfigError(f"loop.candidates: must be >= 2 (a ranking needs two completions), got {config.candidates}")
    feedback = config.feedback
    if not feedback.labeler and not feedback.judge.model and not feedback.app_db:
        raise ConfigError("loop.feedback: set labeler (a module:function), judge.model (an AI judge) or app_db (a labeling database)")
    if feedback.labeler and feedback.judge.model:
        raise ConfigError("loop.feedback: set labeler or judge.model, not both: one labels the items the app does not")
    if feedback.judge.model:
        from rlhf.judge import check_judge

        check_judge(feedback.judge, "loop.feedback.judge")
    if feedback.labeler:
        from rlhf.scoring import load_function

        load_function(feedback.labeler, "loop.feedback.labeler")
    if config.adapters and config.reward_update == "warm":
        raise ConfigError("loop.adapters: a personal reward model is retrained each round (a new labeler needs a head of their own); set loop.reward_update=retrain")
    if config.selection.strategy == "active" and config.selection.pool <= 1:
        raise ConfigError(f"loop.selection.pool: active choice needs a pool larger than the items labelled (> 1), got {config.selection.pool}")


# ---------------------------------------------------------------- one round, step by step


@dataclass
class Round:
    index: int
    dir: Path
    policy: str  # the policy the round samples from and PPO starts from
    previous: str  # the policy before it (the reference in the first round)
    reward: str  # the reward model before this round's ("" in a first round without one)
    timing: dict = field(default_factory=dict)

    def timed(self, step: str, started: float) -> None:
        self.timing[step] = self.timing.get(step, 0.0) + time.perf_counter() - started
        _write_json(self.dir / "timing.json", self.timing)


def _write_json(path: Path, data) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    tmp.replace(path)


def _read_json(path: Path, default=None):
    return json.loads(path.read_text()) if path.exists() else default


POOL_DRAWS = 4
"""Draws of prompts a round makes at most to fill its pool with prompts a ranking can be made for."""


def sample_pool(recipe, config: LoopConfig, rnd: Round) -> Path:
    """pool.jsonl: the round's prompts, drawn from the prompt files, with K candidates each.

    A prompt whose candidates hold fewer than two distinct non-empty completions gives no
    ranking; while the pool has too few usable prompts, more are drawn (up to POOL_DRAWS times),
    so that a peaked or collapsing policy still gets its round's labels."""
    out = rnd.dir / "pool.jsonl"
    if out.exists():
        return out
    records = load_prompts(config.prompts)
    count = max(1, round(config.labels_per_round[rnd.index] * config.selection.pool))
    rows: list[dict] = []
    for draw in range(POOL_DRAWS):
        usable = sum(len(distinct_texts([c["completion"] for c in row["candidates"]])) >= 2 for row in rows)
        if usable >= count:
            break
        rng = random.Random(f"{config.seed}/pool/{rnd.index}/{draw}")
        wanted = count - usable
        chosen = [records[i].prompt for i in sorted(rng.sample(range(len(records)), min(wanted, len(records))))]
        chosen += [rng.choice(records).prompt for _ in range(wanted - len(chosen))]  # more items than prompts
        rows += _candidates(recipe, config, rnd, chosen, seed=(config.seed * 1_000 + rnd.index) * POOL_DRAWS + draw)
    write_jsonl(out, rows)
    return out


def _candidates(recipe, config: LoopConfig, rnd: Round, prompts: list[Content], seed: int) -> list[dict]:
    """Candidates records for the prompts: K from the round's policy, or K - K/2 from it and
    K/2 from the previous one with `from_previous`."""
    from rlhf.generate import generate

    prompts_file = rnd.dir / ".pool_prompts.jsonl"
    write_jsonl(prompts_file, [{"prompt": p} for p in prompts])
    sampling = dataclasses.replace(recipe.ppo.generation, temperature=config.temperature)
    sources = [(rnd.policy, config.candidates)]
    if config.from_previous and rnd.previous != rnd.policy:
        sources = [(rnd.policy, config.candidates - config.candidates // 2), (rnd.previous, config.candidates // 2)]
    parts = []
    for model, num in sources:
        part = rnd.dir / ".pool_part.jsonl"
        generate(model, [str(prompts_file)], part, num, sampling, seed)
        parts.append(load_candidates([str(part)]))
        part.unlink()
    prompts_file.unlink()
    return [{"prompt": group[0].prompt, "candidates": [vars(c) for record in group for c in record.candidates]} for group in zip(*parts)]


def distinct_texts(completions: list[str]) -> list[str]:
    """The non-empty completions, each once, in order: what a ranking can hold."""
    out: list[str] = []
    for text in completions:
        if text.strip() and text not in out:
            out.append(text)
    return out


def select_items(recipe, config: LoopConfig, rnd: Round) -> list[dict]:
    """selected.jsonl: {item, prompt, completions} for the round's labels, chosen from the pool."""
    out = rnd.dir / "selected.jsonl"
    if out.exists():
        return [json.loads(line) for line in out.read_text().splitlines()]
    pool = [(c.prompt, distinct_texts([x.completion for x in c.candidates])) for c in load_candidates([str(rnd.dir / "pool.jsonl")])]
    pool = [(p, texts) for p, texts in pool if len(texts) >= 2]
    if not pool:
        raise RuntimeError(f"{rnd.dir / 'pool.jsonl'}: no prompt has two distinct non-empty candidates to rank; the policy {rnd.policy} may have collapsed (try loop.from_previous=true)")
    wanted = config.labels_per_round[rnd.index]
    if len(pool) < wanted:
        log.warning("loop round %d: %d prompts with two distinct candidates for %d labels; labelling all of them", rnd.index, len(pool), wanted)
    seed = config.seed * 1_000 + rnd.index
    if config.selection.strategy == "active" and rnd.reward:
        chosen, uncertainty = active_choice(config, rnd, pool, wanted, seed)
    else:
        from rlhf.selection import at_random

        chosen, uncertainty = at_random(len(pool), wanted, seed), None
    items = [{"item": n, "prompt": pool[i][0], "completions": pool[i][1]} for n, i in enumerate(chosen)]
    if uncertainty is not None:
        for item, i in zip(items, chosen):
            item["uncertainty"] = uncertainty[i]
    write_jsonl(out, items)
    return items


def _pairs_of(records) -> tuple[list[Content], list[Content], list[Content]]:
    """(prompts, better, worse) of every pair of every ranking (K(K-1)/2 each)."""
    import itertools

    prompts, better, worse = [], [], []
    for r in records:
        for i, j in itertools.combinations(range(len(r.completions)), 2):
            prompts.append(r.prompt), better.append(r.completions[i]), worse.append(r.completions[j])
    return prompts, better, worse


def active_choice(config: LoopConfig, rnd: Round, pool: list[tuple[Content, list[str]]], wanted: int, seed: int) -> tuple[list[int], list[float]]:
    """The `wanted` pool items whose pairs the bootstrap heads of the current reward model
    disagree on most (rlhf.selection), with every pool item's uncertainty."""
    import torch

    from rlhf.models import score_head
    from rlhf.scoring import SequenceClassifierScore
    from rlhf.selection import bootstrap_heads, item_pairs, most_uncertain, pair_disagreement, trunk_features

    score = SequenceClassifierScore.from_pretrained(rnd.reward)
    files = feedback_files(config, rnd.index)
    if not files:
        raise ConfigError("loop.selection.strategy=active with loop.reward in the first round needs loop.initial_feedback: the labels that reward model learnt from, which the ensemble's heads are fitted on")
    labelled = load_feedback(files)
    prompts, better, worse = _pairs_of(labelled)
    features = trunk_features(score, prompts + prompts, better + worse)
    weight = score_head(score.model).weight.detach()[0].float()
    heads = bootstrap_heads(features[: len(prompts)], features[len(prompts) :], weight, config.selection.members, seed)
    sizes = [len(texts) for _, texts in pool]
    flat_prompts = [p for p, texts in pool for _ in texts]
    pool_features = trunk_features(score, flat_prompts, [t for _, texts in pool for t in texts])
    first, second, item = item_pairs(sizes)
    spread = pair_disagreement(heads, pool_features[first], pool_features[second])
    uncertainty = torch.zeros(len(pool)).index_add_(0, torch.tensor(item), spread) / torch.tensor(sizes).mul(torch.tensor(sizes) - 1).div(2)
    log.info("loop round %d: active choice of %d of %d items; mean uncertainty %.4f chosen, %.4f in the pool", rnd.index, wanted, len(pool), uncertainty.sort(descending=True).values[:wanted].mean(), uncertainty.mean())
    return most_uncertain(uncertainty, wanted), uncertainty.tolist()


def app_items(config: LoopConfig, items: list[dict]) -> set[int]:
    """The items that go to people in the labeling app: a fixed share, chosen by the seed."""
    feedback = config.feedback
    if not feedback.app_db:
        return set()
    if not feedback.labeler and not feedback.judge.model:
        return {item["item"] for item in items}
    n = round(len(items) * feedback.app_share)
    return set(random.Random(f"{config.seed}/app").sample([item["item"] for item in items], n))


def collect_feedback(config: LoopConfig, rnd: Round, items: list[dict]) -> Path:
    """feedback.jsonl: every selected item's label. The labeler function's labels are appended
    to feedback.partial.jsonl one by one (a partial last line from a kill is dropped, labelled
    items are not asked again), the app's are read from its database once enough are in; the
    whole is renamed into place."""
    out = rnd.dir / "feedback.jsonl"
    if out.exists():
        return out
    partial = rnd.dir / "feedback.partial.jsonl"
    done = _read_partial(partial)
    to_app = app_items(config, items)
    todo = [item for item in items if item["item"] not in done and item["item"] not in to_app]
    if todo and config.feedback.judge.model:
        for record in judge_feedback(config.feedback.judge, rnd, todo):
            done[record["item"]] = record
    elif todo:
        from tqdm.auto import tqdm

        from rlhf.scoring import load_function

        labeler = load_function(config.feedback.labeler, "loop.feedback.labeler")
        with partial.open("a", encoding="utf-8") as f:
            for item in tqdm(todo, desc=f"labels, round {rnd.index}", dynamic_ncols=True):
                rng = random.Random(f"{config.seed}/label/{rnd.index}/{item['item']}")
                ranking, name = labeler(item["prompt"], list(item["completions"]), rng)
                record = {"item": item["item"], "prompt": item["prompt"], "completions": list(ranking), "labeler": name}
                f.write(json.dumps(record, ensure_ascii=False) + "\n")
                f.flush()
                os.fsync(f.fileno())
                done[item["item"]] = record
    if to_app:
        for record in app_feedback(config, rnd, [item for item in items if item["item"] in to_app]):
            done.setdefault(record["item"], record)
    write_jsonl(out, [done[item["item"]] for item in items if item["item"] in done])
    partial.unlink(missing_ok=True)
    return out


def judge_feedback(judge_config: JudgeConfig, rnd: Round, items: list[dict]) -> list[dict]:
    """The AI judge's rankings of the items, asked in one batch; every answer is cached on disk
    (the round's judge_cache.jsonl unless the judge names a cache), so a killed round asks only
    what is missing. An item whose answers cannot be read is left unlabelled, and counted."""
    from dataclasses import replace

    from rlhf.constitution import load_constitution
    from rlhf.judge import Judge, judge_rankings

    judge_config = replace(judge_config, cache=judge_config.cache or str(rnd.dir / "judge_cache.jsonl"))
    judge = Judge(judge_config)
    asked = [(item["prompt"], list(item["completions"]), None) for item in items]
    records, unread = [], 0
    for item, verdict in zip(items, judge_rankings(judge, load_constitution(judge_config.constitution), asked)):
        if verdict.value is None:
            unread += 1
            continue
        records.append({"item": item["item"], "prompt": item["prompt"], "completions": [item["completions"][i] for i in verdict.value],
                        "labeler": judge_config.labeler, "confidence": verdict.confidence, "principle": verdict.principle})
    if unread:
        log.warning("round %d: the judge's answers to %d of %d items could not be read; they stay unlabelled", rnd.index, unread, len(items))
    return records


def _read_partial(path: Path) -> dict[int, dict]:
    """The labels of a partial feedback file by item; a torn last line (a kill mid-write) is cut off."""
    if not path.exists():
        return {}
    data = path.read_bytes()
    complete = data[: data.rfind(b"\n") + 1]
    if len(complete) < len(data):
        with path.open("r+b") as f:
            f.truncate(len(complete))
    records = [json.loads(line) for line in complete.decode("utf-8").splitlines() if line.strip()]
    return {r["item"]: r for r in records}


def app_tag(rnd: Round) -> str:
    return f"{rnd.dir.resolve()}"


def app_answers(store, tag: str) -> dict[int, dict]:
    """The first live answer (not a skip or a tie) of each of the round's items in the app, as
    a label by item number: one label per item, as the budget counts them."""
    items = {i.id: i for i in store.items().values() if i.source.startswith(f"{tag}#")}
    labels: dict[int, dict] = {}
    for answer in store.live_answers():
        item = items.get(answer.item_id)
        if item is None or not isinstance(answer.value, list):
            continue
        number = int(item.source.rpartition("#")[2])
        labels.setdefault(number, {"item": number, "prompt": item.prompt, "completions": [item.completions[c] for c in answer.value], "labeler": answer.labeler})
    return labels


def app_feedback(config: LoopConfig, rnd: Round, items: list[dict]) -> list[dict]:
    """Queue the items in the labeling app's database (once: an item is known by its prompt and
    completions), wait until `min_answers` of them are answered or `continue` is asked for, and
    return their answers as labels."""
    from rlhf.label.db import Project, Store

    store = Store(config.feedback.app_db)
    if store.project() is None:
        store.set_project(Project("rank", 1, "thumbs"))
    task = store.project().task
    if task != "rank":
        raise ConfigError(f"loop.feedback.app_db: {config.feedback.app_db} is a {task} project; the loop queues rankings (start a new database, or `rlhf label serve --task rank`)")
    tag = app_tag(rnd)
    store.add_items([(item["prompt"], list(item["completions"]), f"{tag}#{item['item']}") for item in items])
    # An item the app already held (the same prompt and completions, queued by an earlier round)
    # is not added again: the round waits for the items it holds.
    queued = sum(item.source.startswith(f"{tag}#") for item in store.items().values())
    wanted = min(config.feedback.min_answers or queued, queued)
    marker = Path(config.project_dir) / "continue"
    while len(labels := app_answers(store, tag)) < wanted and not marker.exists():
        log.info("loop round %d: %d of %d app labels in (waiting for %d; `rlhf loop continue %s` goes on now)", rnd.index, len(labels), len(items), wanted, config.project_dir)
        time.sleep(config.feedback.poll_seconds)
    marker.unlink(missing_ok=True)
    store.close()
    return list(labels.values())


def feedback_files(config: LoopConfig, through: int) -> list[str]:
    """The feedback the reward model of round `through` learns from: the initial files and the
    labels of rounds 0 .. through - 1 (exclusive) or through (inclusive, after its labels)."""
    files = list(config.initial_feedback)
    files += [str(round_dir(config, i) / "feedback.jsonl") for i in range(through + 1) if (round_dir(config, i) / "feedback.jsonl").exists()]
    return files


def fresh_accuracy(rnd: Round, feedback: Path) -> float | None:
    """The last reward model's pairwise accuracy on this round's labels, before it trains on
    them: the honest test of the old reward model on the new policy's samples."""
    if not rnd.reward:
        return None
    from rlhf.scoring import SequenceClassifierScore

    records = load_feedback([str(feedback)])
    prompts, better, worse = _pairs_of(records)
    score = SequenceClassifierScore.from_pretrained(rnd.reward)
    diff = score(prompts, better) - score(prompts, worse)
    return ((diff > 0).float() + 0.5 * (diff == 0).float()).mean().item()


def train_reward(recipe, config: LoopConfig, rnd: Round) -> str:
    from rlhf import reward

    path = rnd.dir / "reward" / "model"
    if path.exists():
        return str(path)
    rc = copy.deepcopy(recipe.reward)
    rc.output_dir, rc.resume, rc.seed = str(rnd.dir / "reward"), True, rc.seed + config.seed * 1_000 + rnd.index
    rc.data.train = feedback_files(config, rnd.index)
    if config.reward_update == "warm" and rnd.reward:
        rc.model = rnd.reward
    rc.personal.enabled = rc.personal.enabled or bool(config.adapters)
    return str(reward.train(rc))


def run_ppo(recipe, config: LoopConfig, rnd: Round, reward_model: str, reference: str) -> str:
    from rlhf import ppo

    path = rnd.dir / "ppo" / "model"
    if path.exists():
        return str(path)
    pc = copy.deepcopy(recipe.ppo)
    pc.policy, pc.reference, pc.output_dir, pc.resume = rnd.policy, reference, str(rnd.dir / "ppo"), True
    pc.reward.kind, pc.reward.path = "model", reward_model
    pc.stop.max_steps, pc.seed = config.ppo_steps, pc.seed + config.seed * 1_000 + rnd.index
    return str(ppo.train(pc))


def run_adapters(recipe, config: LoopConfig, rnd: Round, reward_model: str, reference: str) -> dict[str, str]:
    """{labeler: adapter directory}: a LoRA adapter on the round's policy per labeler of
    `loop.adapters`, trained by PPO against their score of the round's reward model."""
    from rlhf import ppo

    adapters = {}
    known = json.loads((Path(reward_model) / "config.json").read_text()).get("reward_labelers", {})
    for name in config.adapters:
        if name not in known:
            log.warning("loop round %d: no adapter for %s, who has no labels yet (the reward model knows %s)", rnd.index, name, sorted(known))
            continue
        out = rnd.dir / "adapters" / name
        if not (out / "model").exists():
            pc = copy.deepcopy(recipe.ppo)
            pc.policy, pc.reference, pc.output_dir, pc.resume = rnd.policy, reference, str(out), True
            pc.reward.kind, pc.reward.path, pc.reward.labeler = "model", reward_model, name
            pc.lora.enabled = True
            pc.stop.max_steps, pc.seed = config.ppo_steps, pc.seed + config.seed * 1_000 + rnd.index
            ppo.train(pc)
        adapters[name] = str(out / "model" / "adapter")
    return adapters


def run_eval(recipe, config: LoopConfig, rnd: Round, reward_model: str, reference: str) -> dict:
    from rlhf import evaluation

    out = rnd.dir / "eval"
    if not (out / "report.md").exists():
        ec = copy.deepcopy(recipe.eval)
        ec.reference, ec.output_dir = reference, str(out)
        ec.policies = [str(round_dir(config, i) / "ppo" / "model") for i in range(rnd.index + 1)]
        ec.reward.kind, ec.reward.path = "model", reward_model
        ec.runs = [str(rnd.dir / "ppo")]
        evaluation.evaluate(ec)
    return {"results": json.loads((out / "results.json").read_text()), "samples": out / "samples.jsonl"}


def gold_agreement(records, oracle: str) -> dict[str, float] | None:
    """Per labeler and overall: the share of the pairs of their rankings that gold orders the same way."""
    if not oracle:
        return None
    from rlhf.scoring import FunctionScore

    gold = FunctionScore(oracle)
    agree: dict[str, list[float]] = {}
    for r in records:
        scores = gold([r.prompt] * len(r.completions), list(r.completions)).tolist()
        for i in range(len(scores)):
            for j in range(i + 1, len(scores)):
                agree.setdefault(r.labeler or "unknown", []).append(1.0 if scores[i] > scores[j] else 0.5 if scores[i] == scores[j] else 0.0)
    every = [a for votes in agree.values() for a in votes]
    return {"all": sum(every) / len(every), **{name: sum(v) / len(v) for name, v in sorted(agree.items())}} if every else None


def summarize_round(recipe, config: LoopConfig, rnd: Round, feedback: Path, accuracy: float | None, reward_model: str, evaluation: dict) -> dict:
    records = load_feedback([str(feedback)])
    rows = evaluation["results"]
    current = rows[-1]
    previous = rows[-2] if rnd.index > 0 else None
    labels_used = sum(len(load_feedback([f])) for f in feedback_files(config, rnd.index))
    summary = {
        "round": rnd.index,
        "policy": str(rnd.dir / "ppo" / "model"),
        "labels": len(records),
        "labels_total": labels_used,
        "labelers": dict(sorted(Counter(r.labeler or "unknown" for r in records).items())),
        "fresh_accuracy": accuracy,
        "reward_accuracy": _read_json(Path(reward_model).parent / "eval.json", {}).get("accuracy"),
        "gold_agreement": gold_agreement(records, recipe.eval.oracle),
        "win_rate_gold": current.get("win_rate_gold"),
        "win_rate_rm": current.get("win_rate_rm"),
        "kl": current["kl"],
        "eos_fraction": current["eos_fraction"],
        "gold": current.get("gold"),
        "stop_reason": (rnd.dir / "ppo" / "stop_reason.txt").read_text().strip(),
        "time": dict(rnd.timing),
    }
    summary["warnings"] = current.get("warnings", [])
    for key in ("distinct_per_100", "top_share", "distinct_2"):
        if key in current:
            summary[key] = current[key]
    if previous is not None and "gold" in current:
        summary["win_rate_gold_vs_previous"] = _win_rate_between(evaluation["samples"], previous["policy"], current["policy"])
    return summary


def _win_rate_between(samples: Path, before: str, after: str) -> float:
    """Share of prompts where `after`'s gold score beats `before`'s (ties half)."""
    wins = []
    for line in samples.read_text().splitlines():
        row = json.loads(line)
        a, b = row[after]["gold"], row[before]["gold"]
        wins.append(1.0 if a > b else 0.5 if a == b else 0.0)
    return sum(wins) / len(wins)


# ---------------------------------------------------------------- the loop


def run(recipe) -> Path:
    """Run (or continue) every round; returns the loop report."""
    from rlhf import evaluation, ppo, reward, training

    config: LoopConfig = recipe.loop
    processes = training.num_processes()
    check_config(config, processes)
    for section, module in (("reward", reward), ("ppo", ppo), ("eval", evaluation)):
        module.check_config(getattr(recipe, section), processes)
    reference = config.reference or recipe.ppo.policy
    if recipe.sft.model and not Path(reference).exists() and Path(reference) == Path(recipe.sft.output_dir) / "model":
        from rlhf import sft

        log.info("loop: training the reference first (sft section): %s", reference)
        sft.train(recipe.sft)
    project = Path(config.project_dir)
    project.mkdir(parents=True, exist_ok=True)
    _write_json(project / "loop.json", {"app_db": config.feedback.app_db, "labeler": config.feedback.judge.labeler if config.feedback.judge.model else config.feedback.labeler, "rounds": len(config.labels_per_round)})
    policy, previous, reward_model = config.policy or reference, reference, config.reward
    summaries = []
    for index in range(len(config.labels_per_round)):
        rnd = Round(index, round_dir(config, index), policy, previous, reward_model)
        rnd.dir.mkdir(parents=True, exist_ok=True)
        rnd.timing = _read_json(rnd.dir / "timing.json", {})
        summary = _read_json(rnd.dir / "summary.json")
        if summary is None:
            summary = run_round(recipe, config, rnd, reference)
        summaries.append(summary)
        write_report(project, summaries)
        previous, policy, reward_model = policy, summary["policy"], str(rnd.dir / "reward" / "model")
    return project / "report.md"


def run_round(recipe, config: LoopConfig, rnd: Round, reference: str) -> dict:
    log.info("loop round %d: policy %s", rnd.index, rnd.policy)
    started = time.perf_counter()
    sample_pool(recipe, config, rnd)
    rnd.timed("sample", started)
    started = time.perf_counter()
    items = select_items(recipe, config, rnd)
    rnd.timed("select", started)
    started = time.perf_counter()
    feedback = collect_feedback(config, rnd, items)
    rnd.timed("feedback", started)
    accuracy_file = rnd.dir / "fresh_accuracy.json"
    if not accuracy_file.exists():
        _write_json(accuracy_file, {"accuracy": fresh_accuracy(rnd, feedback)})
    accuracy = _read_json(accuracy_file)["accuracy"]
    started = time.perf_counter()
    reward_model = train_reward(recipe, config, rnd)
    rnd.timed("reward", started)
    started = time.perf_counter()
    run_ppo(recipe, config, rnd, reward_model, reference)
    rnd.timed("ppo", started)
    if config.adapters:
        started = time.perf_counter()
        adapters = run_adapters(recipe, config, rnd, reward_model, reference)
        rnd.timed("adapters", started)
    started = time.perf_counter()
    evaluation = run_eval(recipe, config, rnd, reward_model, reference)
    rnd.timed("eval", started)
    summary = summarize_round(recipe, config, rnd, feedback, accuracy, reward_model, evaluation)
    if config.adapters:
        summary["adapters"] = adapters
    _write_json(rnd.dir / "summary.json", summary)
    log.info("loop round %d done: gold win-rate %s, reward-model win-rate %s, KL %.2f", rnd.index, summary["win_rate_gold"], summary["win_rate_rm"], summary["kl"])
    return summary


def _pct(value) -> str:
    return _num(value, "{:.1%}")


def _num(value, fmt: str) -> str:
    return "" if value is None else fmt.format(value)


def write_report(project: Path, summaries: list[dict]) -> Path:
    """report.md and loop.png: per round, gold and reward-model win-rates against the
    reference (their gap is the over-optimisation), KL, the old reward model's accuracy on the
    round's fresh labels, labeler agreement with gold, labels and time."""
    lines = [
        "# Loop report", "",
        "Win-rates are against the reference (the SFT model) on the held-out prompts. The gap between the reward model's",
        "win-rate and gold's is what the policy gets from the reward model that gold does not give: reward hacking, where it grows.",
        "Gold vs previous round: the round's policy against the one before it, by gold, on the same prompts.",
        "Fresh accuracy is the previous reward model's accuracy on the round's new labels, before it trains on them.", "",
        "| round | labels (total) | gold win-rate | RM win-rate | gap | gold vs previous round | KL | ends with EOS | distinct /100 | fresh accuracy | RM held-out accuracy | agreement with gold | time |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for s in summaries:
        gap = s["win_rate_rm"] - s["win_rate_gold"] if s.get("win_rate_rm") is not None and s.get("win_rate_gold") is not None else None
        agreement = (s.get("gold_agreement") or {}).get("all")
        minutes = sum(s["time"].values()) / 60
        lines.append(
            f"| {s['round']} | {s['labels']} ({s['labels_total']}) | {_pct(s.get('win_rate_gold'))} | {_pct(s.get('win_rate_rm'))} | "
            f"{_num(gap and gap * 100, '{:+.1f}')} | {_pct(s.get('win_rate_gold_vs_previous'))} | {s['kl']:.2f} | {_pct(s['eos_fraction'])} | "
            f"{_num(s.get('distinct_per_100'), '{:.0f}')} | {_pct(s.get('fresh_accuracy'))} | "
            f"{_pct(s.get('reward_accuracy'))} | {_pct(agreement)} | {minutes:.1f} min |"
        )
    lines += ["", "![loop](loop.png)", "", "## Warnings", ""]
    signs = [f"- round {s['round']}: {w}" for s in summaries for w in s.get("warnings", [])]
    lines += signs or ["No collapse or over-optimisation signs in any round's policy."]
    lines += ["", "## Stops", ""]
    lines += [f"- round {s['round']}: {s['stop_reason']}" for s in summaries]
    lines += ["", "## Time per step (s)", "", "| round | " + " | ".join(STEPS) + " |", "|---|" + "---|" * len(STEPS)]
    lines += [f"| {s['round']} | " + " | ".join(f"{s['time'].get(k, 0):.0f}" for k in STEPS) + " |" for s in summaries]
    (project / "report.md").write_text("\n".join(lines) + "\n")
    plot(project / "loop.png", summaries)
    return project / "report.md"


STEPS = ("sample", "select", "feedback", "reward", "ppo", "eval")


def plot(path: Path, summaries: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rounds = [s["round"] for s in summaries]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.6))
    for key, label in (("win_rate_gold", "gold"), ("win_rate_rm", "reward model"), ("fresh_accuracy", "old RM on fresh labels")):
        values = [s.get(key) for s in summaries]
        if any(v is not None for v in values):
            left.plot(rounds, [float("nan") if v is None else v for v in values], marker="o", label=label)
    left.axhline(0.5, color="grey", lw=0.8, ls=":")
    left.set(xlabel="round", ylabel="win-rate vs reference / accuracy", title="gold against proxy", xticks=rounds)
    left.legend(fontsize=8)
    right.plot(rounds, [s["kl"] for s in summaries], marker="o", color="tab:red")
    right.set(xlabel="round", ylabel="KL to the reference", title="KL", xticks=rounds)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------- status and continue


def status(project_dir: str) -> str:
    """What each round has done, and the app labels in and wanted where a round waits for them."""
    project = Path(project_dir)
    if not project.is_dir():
        raise ConfigError(f"{project_dir}: no loop project here (run `rlhf loop RECIPE` first)")
    lines = []
    for rnd in sorted(project.glob("round-*")):
        steps = {
            "sampled": (rnd / "pool.jsonl").exists(),
            "selected": (rnd / "selected.jsonl").exists(),
            "labelled": (rnd / "feedback.jsonl").exists(),
            "reward model": (rnd / "reward" / "model").exists(),
            "ppo": (rnd / "ppo" / "model").exists(),
            "evaluated": (rnd / "summary.json").exists(),
        }
        done = [k for k, v in steps.items() if v]
        line = f"{rnd.name}: " + (", ".join(done) if done else "started")
        if steps["selected"] and not steps["labelled"]:
            selected = len((rnd / "selected.jsonl").read_text().splitlines())
            config = _read_json(project / "loop.json", {})
            if config.get("labeler"):
                line += f"; {len(_read_partial(rnd / 'feedback.partial.jsonl'))} of {selected} labels from {config['labeler']}"
            if config.get("app_db"):
                from rlhf.label.db import Store

                answered = app_answers(Store(config["app_db"]), str(rnd.resolve()))
                line += f"; {len(answered)} answered in the app ({config['app_db']})"
        summary = _read_json(rnd / "summary.json")
        if summary:
            line += f"; gold win-rate {_pct(summary.get('win_rate_gold'))}, KL {summary['kl']:.2f}"
        lines.append(line)
    return "\n".join(lines) or f"{project_dir}: no round started yet"


def ask_to_continue(project_dir: str) -> Path:
    marker = Path(project_dir) / "continue"
    if not Path(project_dir).is_dir():
        raise ConfigError(f"{project_dir}: no loop project here")
    marker.write_text("go on with the labels that are in\n")
    return marker
