"""The gold critic and reviser of the demo: what each principle of the demo constitution finds wrong
with a reply, and the reply rewritten to follow it, both computed from the demo world.

    gold_critique(prompt, completion, "harmless")   # 'The response insults the user: "What a stupid question."'
    gold_revision(prompt, completion, "harmless")   # the completion without its insults
    principle_score(prompt, completion, "harmless") # the part of the gold score the principle stands for

Each principle of rlhf/demo/constitution.yaml stands for parts of the gold score (rlhf/demo/gold.py):

    helpful    answer, wrong topic   an answer to another topic; no answer
    harmless   toxicity              a sentence with an insult
    polite     politeness, curt      a curt sentence; no polite phrase at all
    concise    needless, repeats,    a repeated sentence; filler; a vague non-answer beside the
               length                answer (a vague reply without one is helpful's business)

A critique is one sentence naming the first problem the principle finds, quoting the sentence
at fault, or exactly `rlhf.judge.NO_PROBLEM`. A revision fixes every problem of the principle:

    helpful    wrong-topic answers go, and so do vague non-answers where there is no answer; the
               topic's most complete answer takes the place of the first of them (or, where
               there is none, leads the reply, after its polite opener)
    harmless   insulting sentences go
    polite     curt sentences go; a reply left with no polite phrase gets an opener and a closer
    concise    repeated sentences, filler and vague non-answers beside the answer go

A revision is the reply itself exactly when the critique is NO_PROBLEM, never lowers the gold
part of its principle, and never leaves the reply empty (`FALLBACK` stands where nothing is
left). Sentences the world does not know are kept: no principle speaks for them. These are the
demo judge's training targets for critiques and revisions (rlhf/demo/judge.py), and what the
revisions of `rlhf cai` on the demo can be checked against.
"""

from __future__ import annotations

from rlhf.demo.corpus import CURT, FILLER, POLITE_CLOSERS, POLITE_OPENERS, TOPIC_BY_NAME, TOPICS, VAGUE, format_completion
from rlhf.demo.gold import INSULTS, REPEAT_PENALTY, detect_topic, gold_breakdown, split_sentences
from rlhf.judge import NO_PROBLEM

PRINCIPLES = ("helpful", "harmless", "polite", "concise")
OPENER = "Happy to help with that."
CLOSER = "Hope this helps!"
FALLBACK = OPENER
"""What a revision says when nothing of the reply is left."""


def _normal(sentence: str) -> str:
    return " ".join(sentence.lower().split())


_KIND: dict[str, tuple[str, str | None]] = {}  # normalised sentence -> (kind, topic of an answer)
for _topic in TOPICS:
    _KIND.update({_normal(s): ("answer", _topic.name) for s in _topic.answers})
_KIND.update({_normal(s): ("opener", None) for s in POLITE_OPENERS})
_KIND.update({_normal(s): ("closer", None) for s in POLITE_CLOSERS})
_KIND.update({_normal(s): (kind, None) for kind, group in (("curt", CURT), ("filler", FILLER), ("vague", VAGUE)) for s in group})


def _kind(sentence: str, topic: str | None) -> str:
    """insult, answer, wrong_topic, opener, closer, curt, filler, vague or unknown (as gold reads it)."""
    if INSULTS.search(sentence.lower()):
        return "insult"
    kind, answer_topic = _KIND.get(_normal(sentence), ("unknown", None))
    return "wrong_topic" if kind == "answer" and answer_topic != topic else kind


def _check(principle: str) -> None:
    if principle not in PRINCIPLES:
        raise ValueError(f"the demo's gold critic knows the principles {', '.join(PRINCIPLES)}, not {principle!r}")


def principle_score(prompt: str, completion: str, principle: str) -> float:
    """The parts of the gold score that `principle` stands for (see the module docstring)."""
    _check(principle)
    gold = gold_breakdown(prompt, completion)
    if principle == "helpful":
        return gold.answer + gold.wrong_topic
    if principle == "harmless":
        return gold.toxicity
    if principle == "polite":
        return gold.politeness + gold.curt
    sentences = [_normal(s) for s in split_sentences(completion)]
    return gold.needless + gold.length + REPEAT_PENALTY * (len(sentences) - len(set(sentences)))


def _best_answer(topic: str) -> str:
    answers = TOPIC_BY_NAME[topic].answers
    return max(answers, key=lambda s: answers[s])


def _problems(prompt: str, completion: str, principle: str) -> list[tuple[int, str]]:
    """(index of the sentence at fault or -1, the critique) for every problem, in reading order."""
    topic = detect_topic(prompt)
    sentences = split_sentences(completion)
    kinds = [_kind(s, topic) for s in sentences]
    quoted = lambda i, what: (i, f'{what}: "{sentences[i]}"')
    if principle == "harmless":
        return [quoted(i, "The response insults the user") for i, k in enumerate(kinds) if k == "insult"]
    if principle == "polite":
        problems = [quoted(i, "The response is curt") for i, k in enumerate(kinds) if k == "curt"]
        if "opener" not in kinds and "closer" not in kinds:
            problems.append((-1, "The response has no kind word for the user."))
        return problems
    if principle == "concise":
        problems, seen = [], set()
        for i, (s, k) in enumerate(zip(sentences, kinds)):
            if _normal(s) in seen:
                problems.append(quoted(i, "The response repeats itself"))
            elif k == "filler":
                problems.append(quoted(i, "The response has filler"))
            elif k == "vague" and "answer" in kinds:
                problems.append(quoted(i, "The response has a vague non-answer beside the answer"))
            seen.add(_normal(s))
        return problems
    problems = [quoted(i, "The response answers a different question") for i, k in enumerate(kinds) if k == "wrong_topic"]
    if topic is not None and "answer" not in kinds:
        vague = [i for i, k in enumerate(kinds) if k == "vague"]
        problems += [quoted(i, "The response does not answer the question") for i in vague] or [(-1, "The response does not answer the question.")]
    return sorted(problems, key=lambda p: p[0] if p[0] >= 0 else len(sentences))


def gold_critique(prompt: str, completion: str, principle: str) -> str:
    """One sentence: the first problem `principle` finds in the completion, or NO_PROBLEM."""
    _check(principle)
    problems = _problems(prompt, completion, principle)
    return problems[0][1] if problems else NO_PROBLEM


def gold_revision(prompt: str, completion: str, principle: str) -> str:
    """The completion rewritten to follow `principle` (see the module docstring); the completion
    itself when it has no problem. Returned as a completion: a leading space, no EOS."""
    _check(principle)
    if not _problems(prompt, completion, principle):
        return completion
    topic = detect_topic(prompt)
    sentences = split_sentences(completion)
    kinds = [_kind(s, topic) for s in sentences]
    if principle == "harmless":
        kept = [s for s, k in zip(sentences, kinds) if k != "insult"]
    elif principle == "polite":
        kept = [s for s, k in zip(sentences, kinds) if k != "curt"]
        if "opener" not in kinds and "closer" not in kinds:
            kept = [OPENER, *kept, CLOSER]
    elif principle == "concise":
        kept, seen = [], set()
        for s, k in zip(sentences, kinds):
            if _normal(s) not in seen and k != "filler" and not (k == "vague" and "answer" in kinds):
                kept.append(s)
            seen.add(_normal(s))
    else:
        kept = _helpful(sentences, kinds, topic)
    return format_completion(" ".join(kept) or FALLBACK)


def _helpful(sentences: list[str], kinds: list[str], topic: str | None) -> list[str]:
    if topic is None:  # a prompt outside the world: no answer to put in, only wrong ones to take out
        return [s for s, k in zip(sentences, kinds) if k != "wrong_topic"]
    answer, answered = _best_answer(topic), "answer" in kinds
    kept, placed = [], False
    for s, k in zip(sentences, kinds):
        if k == "wrong_topic" or (k == "vague" and not answered) or (k == "answer" and placed):
            if not placed and k != "answer":
                kept.append(answer)
                placed = True
            continue
        kept.append(s)
        placed = placed or k == "answer"
    if not placed:  # after the polite opener, if the reply opens with one
        at = 1 if kept and _kind(kept[0], topic) == "opener" else 0
        kept.insert(at, answer)
    return kept
