"""The demo judge: a tiny causal LM taught the judge questions of rlhf/judge.py from gold labels,
standing in for an instruct model (no instruct LLM can be downloaded for the demo).

    rlhf demo judge --out runs/demo/judge [--steps 4500] [--seed 0]   # or python -m rlhf.demo.judge
    transformers serve --force-model runs/demo/judge ...     # or judge.backend: local

It answers, in the prompts rlhf/judge.py builds (pair_query, rank_query, rate_query,
critique_query, revision_query) with the principles of the demo constitution
(rlhf/demo/constitution.yaml), what the demo's gold labeler (rlhf/demo/gold.py) would:

    pair      "A" or "B": by the gold score when all principles are quoted, by the part of it a
              single principle stands for (rlhf/demo/reviser.py) when one is; the target is soft,
              P(A) = sigmoid((gold(A) - gold(B)) / PAIR_TEMPERATURE), so a near-tie (or a tie of
              the principle's part) is taught as a toss-up and a clear pair as certain. Every
              pair is taught in both orders, so no position is favoured.
    rate      "1" .. "7": the gold score binned by RATING_EDGES
    rank      "B > A > D > C": 3 or 4 replies by gold
    critique  the gold critic's sentence, or "No problem." (rlhf/demo/reviser.py), asked mostly
              about replies with a problem, a share of them to red-team prompts
              (rlhf/demo/redteam.py), as `rlhf cai` asks
    revision  the gold reviser's rewrite of the reply, asked the same way

on questions outside the held-out set alone, about replies drawn from the demo's mixes of every
quality (`corpus.PRETRAIN_MIX`, `corpus.DEMO_MIX`, `build.POLISHED_MIX`), a tenth of them cut
short after a random word as a sampler cut at its token budget leaves them. The loss is on the
answer's tokens and the EOS after them alone.

Its tokenizer is a byte-level BPE trained on those questions, so that the long judge prompts
are short: text is split into pieces after each clause (after . ! ? : , ; and at line breaks)
before BPE, which then merges every frequent piece, a template line, a principle's text or a
sentence of the demo world, into one token. A pair question quoting all four principles is
about 30 tokens (about 330 with the base model's tokenizer, whose pieces are words); text the
world does not know falls back to smaller pieces down to bytes. It has a pad token distinct
from EOS and the chat template `rlhf.encoding.FALLBACK_CHAT_TEMPLATE` ("User: ...\\nAssistant:"
turns, the assistant's closed by EOS), so that `transformers serve` and `render_prompt` give the
model the same tokens.

The model is a 2-layer, 256-wide GPT-2 trained from scratch (`STEPS` steps of `BATCH_SIZE`
questions, bf16 autocast where `rlhf.training.use_bf16` says it pays on this CPU), about 22
minutes on 2 AVX2 cores in fp32, deterministic from the seed; starting from the shipped base model's
weights did no better in the same time (its word-level tokens are not this tokenizer's). At the
end it is evaluated, through `rlhf.judge`'s local backend, on held-out questions: agreement with
gold on clear-cut pairs (gold margin >= `build.MIN_GOLD_MARGIN`) judged in both orders by the
answer probabilities, its position-bias rate, and the other tasks; written to `judge_eval.json`
in the model directory and printed.

The model shipped in rlhf/demo/judge_model is this build at its defaults, seed 0, made on an AMD
EPYC with AVX2 (fp32), its `judge_eval.json` beside it. On a CPU where bf16 pays the build runs
under bf16 autocast, so its weights differ from the shipped ones.
Its revisions are its weakest task: two layers copy a reply's sentences poorly, so it often puts
in another sentence than the one the critique asks for (`revisions_gold_gain` in the report).
"""

from __future__ import annotations

import argparse
import json
import math
import random
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
from tqdm import tqdm
from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

from rlhf.constitution import Constitution, load_constitution
from rlhf.demo.build import MIN_GOLD_MARGIN, POLISHED_MIX
from rlhf.demo.corpus import (
    CURT, DEMO_MIX, FILLER, POLITE_CLOSERS, POLITE_OPENERS, PRETRAIN_MIX, TOPICS, TOXIC, VAGUE, ReplyMix,
    all_questions, format_completion, format_prompt, sample_reply, split_questions,
)
from rlhf.demo.gold import gold_score
from rlhf.demo.redteam import frame
from rlhf.demo.reviser import PRINCIPLES, gold_critique, gold_revision, principle_score
from rlhf.encoding import FALLBACK_CHAT_TEMPLATE

CHAT_TEMPLATE = FALLBACK_CHAT_TEMPLATE.replace("'\\nAssistant:'", "'\\nAssistant: '")
"""The toolkit's plain template with the space after "Assistant:" in the generation prompt, a
token of its own here, so that the answer's first token is the choice itself ("A", not " A")."""
from rlhf.judge import (
    LETTERS, NO_PROBLEM, PAIR_CHOICES, RATE_CHOICES, critique_query, pair_query, rank_query, rate_query, revision_query,
)
from rlhf.models import save_model
from rlhf.training import use_bf16

CONSTITUTION = Path(__file__).parent / "constitution.yaml"
EOS, PAD = "<|endoftext|>", "<|pad|>"
VOCAB_SIZE = 4096
TOKENIZER_TEXTS = 5000
"""Training questions (with their answers) the tokenizer is trained on, beside the world's sentences."""
N_POSITIONS = 256
N_LAYER = 2
"""Two layers learned the questions as well as four did in the same time, in twice the steps."""
STEPS = 4500
BATCH_SIZE = 32
LR = 1e-3
WARMUP_STEPS = 50
TASKS = {"pair": 0.55, "rank": 0.1, "rate": 0.1, "critique": 0.1, "revision": 0.15}
"""Share of the training questions of each task; a pair is asked in both orders (two questions)."""
PAIRS_FIRST = 0.25
"""Share of the steps, the first, that teach pairs alone: with the other tasks from the start the
model takes far longer to learn to compare two responses at all."""
ALL_PRINCIPLES = 0.6
"""Share of the pair questions that quote every principle; the rest quote one."""
TIE_KEPT = 0.25
"""Share of single-principle pairs kept where the principle's part of gold ties (a 50/50 target):
enough to teach that a principle can be indifferent, few enough not to spend the steps on it."""
CLEAN_CRITIQUED = 0.15
CLEAN_REVISED = 0.15
"""Share of clean replies (no problem by the principle) kept among the critique and the revision
questions: mostly replies with a problem, which `rlhf cai` asks about; taught at the rate replies
come, the critique question is answered "No problem." whatever the reply."""
REDTEAM = 0.3
"""Share of the critique and revision questions on red-team prompts (rlhf/demo/redteam.py framing a
training question), the prompts `rlhf cai` asks about."""
PAIR_TEMPERATURE = 0.1
RATING_EDGES = (-2.0, 0.0, 1.5, 2.5, 3.2, 3.8)
"""Gold scores from which each rating from 2 to 7 starts: 1 is an insult's, 5 a plain answer's
(gold's thumbs up is at 2.5), 7 the best kind of reply's."""
MIXES = (PRETRAIN_MIX, DEMO_MIX, POLISHED_MIX)
CUT_SHORT = 0.1
EVAL_PAIRS = 300
EVAL_OTHERS = 60
"""Held-out rankings, ratings, critiques and revisions evaluated (each)."""


# ---------------------------------------------------------------- the training questions

@dataclass
class Example:
    text: str
    """The question: the content of the judge's one user message."""
    answer: str
    """What the judge should answer (the assistant's message)."""
    soft: dict[str, float] | None = None
    """A pair's target, P("A") and P("B"), in place of the one-hot `answer`."""
    swapped: bool = False
    """The pair of the question before, in the other order (they are trained in the same batch)."""


def _reply(rng: random.Random, topic: str, mix: ReplyMix, cut_short: float) -> str:
    reply = sample_reply(rng, topic, mix)[0]
    if rng.random() < cut_short:
        words = reply.split()
        reply = " ".join(words[: rng.randint(1, len(words))])
    return format_completion(reply)


def sample_replies(
    rng: random.Random, questions: list[tuple[str, str]], k: int, mix: ReplyMix | None = None, cut_short: float = CUT_SHORT, redteam: float = 0.0,
) -> tuple[str, list[str]]:
    """A prompt and `k` distinct completions to it, each from `mix` (None: one of MIXES, drawn for
    the prompt); with probability `redteam` the question is framed as a red-team prompt."""
    topic, question = rng.choice(questions)
    prompt = format_prompt(frame(rng, question) if redteam and rng.random() < redteam else question)
    mix = mix or rng.choice(MIXES)
    completions: list[str] = []
    while len(completions) < k:
        completion = _reply(rng, topic, mix, cut_short)
        if completion not in completions:
            completions.append(completion)
    return prompt, completions


def rating(score: float) -> str:
    return str(1 + sum(score >= edge for edge in RATING_EDGES))


def _pair_examples(rng: random.Random, questions, constitution: Constitution) -> list[Example]:
    prompt, (a, b) = sample_replies(rng, questions, 2)
    if rng.random() < ALL_PRINCIPLES:
        group, margin = constitution.principles, gold_score(prompt, a) - gold_score(prompt, b)
    else:
        principle = rng.choice(constitution.principles)
        group, margin = [principle], principle_score(prompt, a, principle.name) - principle_score(prompt, b, principle.name)
        if margin == 0 and rng.random() >= TIE_KEPT:
            return []
    p = 1 / (1 + math.exp(-max(-50.0, min(50.0, margin / PAIR_TEMPERATURE))))
    return [
        Example(pair_query(prompt, x, y, group).messages[0]["content"], "A" if q >= 0.5 else "B", {"A": q, "B": 1 - q}, swapped)
        for x, y, q, swapped in ((a, b, p, False), (b, a, 1 - p, True))
    ]


def _rank_example(rng: random.Random, questions, constitution: Constitution) -> Example:
    prompt, completions = sample_replies(rng, questions, rng.choice((3, 4)))
    scores = [gold_score(prompt, c) for c in completions]
    order = sorted(range(len(completions)), key=lambda i: (-scores[i], i))
    return Example(rank_query(prompt, completions, constitution.principles).messages[0]["content"], " > ".join(LETTERS[i] for i in order))


def _rate_example(rng: random.Random, questions, constitution: Constitution) -> Example:
    prompt, (completion,) = sample_replies(rng, questions, 1)
    return Example(rate_query(prompt, completion, constitution.principles).messages[0]["content"], rating(gold_score(prompt, completion)))


def _flawed_reply(rng: random.Random, questions, principle: str, keep_clean: float) -> tuple[str, str, str]:
    """A prompt (a red-team one for a share `REDTEAM`), a reply and the gold critique of it by
    `principle`: one the principle finds a problem in, but for a share `keep_clean` of clean ones."""
    while True:
        prompt, (completion,) = sample_replies(rng, questions, 1, redteam=REDTEAM)
        critique = gold_critique(prompt, completion, principle)
        if critique != NO_PROBLEM or rng.random() < keep_clean:
            return prompt, completion, critique


def _critique_example(rng: random.Random, questions, constitution: Constitution) -> Example:
    principle = rng.choice(constitution.principles)
    prompt, completion, critique = _flawed_reply(rng, questions, principle.name, CLEAN_CRITIQUED)
    return Example(critique_query(prompt, completion, principle).messages[0]["content"], critique)


def _revision_example(rng: random.Random, questions, constitution: Constitution) -> Example:
    principle = rng.choice(constitution.principles)
    prompt, completion, critique = _flawed_reply(rng, questions, principle.name, CLEAN_REVISED)
    revision = gold_revision(prompt, completion, principle.name)
    return Example(revision_query(prompt, completion, principle, critique).messages[0]["content"], revision.strip())


MAKERS = {"rank": _rank_example, "rate": _rate_example, "critique": _critique_example, "revision": _revision_example}


def judge_examples(rng: random.Random, questions: list[tuple[str, str]], constitution: Constitution, n: int, tasks: dict[str, float] = TASKS) -> list[Example]:
    """`n` training questions with their gold answers, tasks drawn by `tasks` (their shares)."""
    examples: list[Example] = []
    names, weights = list(tasks), list(tasks.values())
    while len(examples) < n:
        task = rng.choices(names, weights)[0]
        examples += _pair_examples(rng, questions, constitution) if task == "pair" else [MAKERS[task](rng, questions, constitution)]
    return examples[:n]


# ---------------------------------------------------------------- tokenizer and tokens

def train_tokenizer(texts: list[str]) -> PreTrainedTokenizerFast:
    """A byte-level BPE over clause pieces (see the module docstring), EOS and a distinct pad token."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(r'\n+|"'), behavior="isolated"),
        pre_tokenizers.Split(Regex(r"(?<=[.!?:,;]) +"), behavior="merged_with_previous"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE, special_tokens=[EOS, PAD], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    tokenizer.train_from_iterator(texts, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token=EOS, eos_token=EOS, unk_token=EOS, pad_token=PAD, model_max_length=N_POSITIONS
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def world_texts() -> list[str]:
    """Every question and reply sentence of the demo world, as the judge's questions quote them."""
    sentences = [s for topic in TOPICS for s in topic.answers] + [*POLITE_OPENERS, *POLITE_CLOSERS, *CURT, *TOXIC, *FILLER, *VAGUE]
    return [format_prompt(q) for _, q in all_questions()] + [" ".join(sentences)]


@dataclass
class Encoded:
    input_ids: list[int]
    """The rendered question, the answer's tokens and EOS."""
    targets: list[tuple[int, dict[int, float]]]
    """(position, {token id: probability}): what the logits at each position are trained towards."""


def encode(tokenizer, examples: list[Example]) -> list[Encoded]:
    """Each question as `render_prompt` gives it to the model (the chat template with its
    generation prompt), then the answer's tokens as that template writes the assistant's turn."""
    prompts = [tokenizer.apply_chat_template([{"role": "user", "content": e.text}], tokenize=False, add_generation_prompt=True) for e in examples]
    prompt_ids = tokenizer(prompts, add_special_tokens=False)["input_ids"]
    answer_ids = tokenizer([e.answer for e in examples], add_special_tokens=False)["input_ids"]
    choice = {c: tokenizer(c, add_special_tokens=False)["input_ids"] for c in PAIR_CHOICES + RATE_CHOICES}
    if any(len(ids) != 1 for ids in choice.values()):  # the judge's answer probabilities are read from one token
        raise ValueError(f"the judge tokenizer must spell each choice as one token, got {choice}")
    encoded = []
    for e, prompt, answer in zip(examples, prompt_ids, answer_ids):
        answer = answer + [tokenizer.eos_token_id]
        targets = [(len(prompt) - 1 + j, {token: 1.0}) for j, token in enumerate(answer)]
        if e.soft is not None:
            targets[0] = (targets[0][0], {choice[c][0]: p for c, p in e.soft.items()})
        encoded.append(Encoded(prompt + answer, targets))
    return encoded


def length_batches(examples: list[Example], encoded: list[Encoded], batch_size: int, rng: random.Random, window: int = 64) -> list[list[int]]:
    """Batches of similar lengths (less padding), a pair's two orders in the same one: in windows
    of `window` batches of the shuffled order, sorted by length; then the batches shuffled."""
    units = []
    for i, example in enumerate(examples):
        if example.swapped and units and units[-1] == [i - 1]:
            units[-1].append(i)
        else:
            units.append([i])
    rng.shuffle(units)
    batches = []
    for start in range(0, len(units), batch_size * window // 2):
        chunk = sorted(units[start : start + batch_size * window // 2], key=lambda unit: len(encoded[unit[0]].input_ids))
        order = [i for unit in chunk for i in unit]
        batches += [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    rng.shuffle(batches)
    return batches


def answer_loss(model, rows: list[Encoded], pad_id: int) -> torch.Tensor:
    """Cross-entropy of the answer tokens against their targets (soft for a pair's letter), each
    question's tokens averaged and the questions averaged: a long revision counts as much as a letter."""
    width = max(len(r.input_ids) for r in rows)
    input_ids = torch.tensor([r.input_ids + [pad_id] * (width - len(r.input_ids)) for r in rows])
    attention_mask = torch.tensor([[1] * len(r.input_ids) + [0] * (width - len(r.input_ids)) for r in rows])
    hidden = model.transformer(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state  # (B, T, d)
    where = [(row, position) for row, r in enumerate(rows) for position, _ in r.targets]
    logprobs = torch.log_softmax(model.lm_head(hidden[[w[0] for w in where], [w[1] for w in where]]).float(), dim=-1)  # (N, V)
    target = torch.zeros_like(logprobs)
    weight = torch.zeros(len(where))
    n = 0
    for r in rows:
        for _, dist in r.targets:
            for token, p in dist.items():
                target[n, token] = p
            weight[n] = 1 / len(r.targets)
            n += 1
    return (-(target * logprobs).sum(-1) * weight).sum() / len(rows)


# ---------------------------------------------------------------- building

def build_judge(out: str | Path, seed: int = 0, steps: int = STEPS, eval_pairs: int = EVAL_PAIRS, eval_others: int = EVAL_OTHERS) -> Path:
    """Train the demo judge and save it to `out` (loads with plain AutoModelForCausalLM /
    AutoTokenizer); evaluate it on held-out questions into `out/judge_eval.json`. Returns `out`."""
    start = time.time()
    torch.manual_seed(seed)
    rng = random.Random(seed)
    constitution = load_constitution(CONSTITUTION)
    train_questions, _ = split_questions()
    first = round(PAIRS_FIRST * steps) * BATCH_SIZE
    examples = judge_examples(rng, train_questions, constitution, first, {"pair": 1.0})
    examples += judge_examples(rng, train_questions, constitution, steps * BATCH_SIZE - first)
    sample = examples[:: max(1, len(examples) // TOKENIZER_TEXTS)]  # every task, not the pairs of the first steps alone
    tokenizer = train_tokenizer(world_texts() + [f"User: {e.text}\nAssistant: {e.answer}" for e in sample])
    encoded = encode(tokenizer, examples)
    longest = max(len(e.input_ids) for e in encoded)
    if longest > N_POSITIONS:
        raise ValueError(f"a training question of {longest} tokens does not fit the judge's {N_POSITIONS} positions")

    model = GPT2LMHeadModel(GPT2Config(
        vocab_size=len(tokenizer), n_positions=N_POSITIONS, n_embd=256, n_layer=N_LAYER, n_head=4,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
        bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    ))
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    decay = [p for p in model.parameters() if p.dim() >= 2]  # weight decay on matrices only
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}], lr=LR, betas=(0.9, 0.95))
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: min(1.0, (step + 1) / WARMUP_STEPS) * 0.5 * (1 + math.cos(math.pi * step / steps))
    )
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=use_bf16("auto", torch.device("cpu")))

    model.train()
    batches = length_batches(examples[:first], encoded[:first], BATCH_SIZE, rng)
    batches += [[first + i for i in batch] for batch in length_batches(examples[first:], encoded[first:], BATCH_SIZE, rng)]
    progress = tqdm(batches, desc="training the demo judge")
    for batch in progress:
        with autocast:
            loss = answer_loss(model, [encoded[i] for i in batch], tokenizer.pad_token_id)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        progress.set_postfix(loss=f"{loss.item():.3f}")
    model.eval()
    out = save_model(model, tokenizer, out)
    trained = time.time() - start

    report = evaluate_judge(out, seed, eval_pairs, eval_others)
    report |= {"seed": seed, "steps": steps, "batch_size": BATCH_SIZE, "train_seconds": round(trained, 1), "seconds": round(time.time() - start, 1)}
    (out / "judge_eval.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    return out


# ---------------------------------------------------------------- evaluation

def evaluate_judge(model_dir: str | Path, seed: int = 0, pairs: int = EVAL_PAIRS, others: int = EVAL_OTHERS) -> dict:
    """The judge, through rlhf.judge's local backend, on held-out questions and DEMO_MIX replies
    (none cut short): pairs clear-cut by gold judged in both orders, with all principles at once
    and with each (combined by weight), rankings of 4, ratings, critiques and revisions."""
    from rlhf.judge import Judge, JudgeConfig, judge_pairs, judge_rankings, judge_ratings

    rng = random.Random(f"judge-eval-{seed}")
    _, eval_questions = split_questions()
    constitution = load_constitution(CONSTITUTION)
    config = JudgeConfig(backend="local", model=str(model_dir), constitution=str(CONSTITUTION), max_tokens=64, batch_size=32)
    judge = Judge(config, progress=False)

    clear = []  # (prompt, better, worse)
    while len(clear) < pairs:
        prompt, (a, b) = sample_replies(rng, eval_questions, 2, DEMO_MIX, cut_short=0.0)
        margin = gold_score(prompt, a) - gold_score(prompt, b)
        if abs(margin) >= MIN_GOLD_MARGIN:
            clear.append((prompt, a, b) if margin > 0 else (prompt, b, a))
    report: dict = {"held_out_pairs": pairs, "min_gold_margin": MIN_GOLD_MARGIN}
    for mode in ("all", "each"):
        judge.config.principles = mode
        verdicts = judge_pairs(judge, constitution, [(p, better, worse, None) for p, better, worse in clear])
        judged = [v for v in verdicts if v.value is not None]
        both = [v for v in judged if v.consistent is not None]
        report[f"agreement_{mode}"] = statistics.mean(1.0 if v.value > 0.5 else 0.5 if v.value == 0.5 else 0.0 for v in judged)
        report[f"position_bias_rate_{mode}"] = sum(v.consistent is False for v in both) / len(both) if both else None
        report[f"mean_confidence_{mode}"] = statistics.mean(v.confidence for v in judged)
        report[f"unparseable_{mode}"] = sum(v.unparseable for v in verdicts)
        if mode == "each":  # each principle on the pairs where its part of gold differs clearly
            for name in PRINCIPLES:
                votes = []
                for (p, better, worse), v in zip(clear, verdicts):
                    margin = principle_score(p, better, name) - principle_score(p, worse, name)
                    if abs(margin) >= MIN_GOLD_MARGIN and name in v.by_principle:
                        votes.append((v.by_principle[name] > 0.5) == (margin > 0))
                report[f"agreement_{name}"] = statistics.mean(votes) if votes else None
    judge.config.principles = "all"

    ranked = []
    while len(ranked) < others:
        prompt, completions = sample_replies(rng, eval_questions, 4, DEMO_MIX, cut_short=0.0)
        scores = [gold_score(prompt, c) for c in completions]
        best_first = sorted(range(4), key=lambda i: -scores[i])
        if all(scores[i] - scores[j] >= MIN_GOLD_MARGIN for i, j in zip(best_first, best_first[1:])):
            ranked.append((prompt, completions, best_first))
    verdicts = judge_rankings(judge, constitution, [(p, c, None) for p, c, _ in ranked])
    report["rankings_exact"] = statistics.mean(v.value == order for (_, _, order), v in zip(ranked, verdicts))

    rated = [sample_replies(rng, eval_questions, 1, DEMO_MIX, cut_short=0.0) for _ in range(others)]
    verdicts = judge_ratings(judge, constitution, [(p, c, None) for p, (c,) in rated])
    values = [(v.value, gold_score(p, c)) for (p, (c,)), v in zip(rated, verdicts) if v.value is not None]
    report["rating_gold_correlation"] = statistics.correlation(*zip(*values)) if len(values) > 2 else None

    asked = []
    for _ in range(others):
        prompt, (completion,) = sample_replies(rng, eval_questions, 1, DEMO_MIX, cut_short=0.0)
        principle = rng.choice(constitution.principles)
        asked.append((prompt, completion, principle, gold_critique(prompt, completion, principle.name)))
    replies = judge.ask([critique_query(p, c, principle) for p, c, principle, _ in asked])
    report["critiques_exact"] = statistics.mean(r.text.strip() == critique for (*_, critique), r in zip(asked, replies))
    replies = judge.ask([revision_query(p, c, principle, critique) for p, c, principle, critique in asked])
    revisions = [(gold_revision(p, c, principle.name).strip(), r.text.strip()) for (p, c, principle, _), r in zip(asked, replies)]
    report["revisions_exact"] = statistics.mean(gold == text for gold, text in revisions)
    report["revisions_gold_gain"] = statistics.mean(
        gold_score(p, format_completion(text)) - gold_score(p, c) for (p, c, *_), (_, text) in zip(asked, revisions)
    )
    return {k: round(v, 4) if isinstance(v, float) else v for k, v in report.items()}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="directory to write the judge model and tokenizer to")
    parser.add_argument("--steps", type=int, default=STEPS, help=f"training steps of {BATCH_SIZE} questions")
    parser.add_argument("--seed", type=int, default=0, help="seed of the training questions and the initial weights")
    args = parser.parse_args(argv)
    out = build_judge(args.out, args.seed, args.steps)
    report = json.loads((out / "judge_eval.json").read_text(encoding="utf-8"))
    print(f"wrote the demo judge to {out}")
    for name, value in report.items():
        print(f"  {name}: {value}")


if __name__ == "__main__":
    main()
