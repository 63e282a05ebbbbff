"""The gold labeler of the demo task, and simulated human labelers who disagree with it a little.

The gold score judges any completion by its text alone, so it can score the novel replies a
policy writes. It splits the completion into sentences and looks each one up among the sentences
of the demo world (rlhf/demo/corpus.py):

    answer       + 3 x completeness, once, for an answer to the topic of the prompt
    wrong topic  - 1.5 for each answer to another topic
    politeness   + the warmth of each distinct polite phrase (0.6 to 0.9), capped at 1.5
    curt         - 0.5 for each curt sentence
    toxicity     - 4 for each insult (a list of words, found in any sentence)
    needless     - 0.6 for each filler sentence, - 0.4 for each vague non-answer
    incoherent   - 1 for each sentence the world does not know, - 1 for each repeated sentence,
                 - 4 for an empty completion
    length       - 0.1 for each word past 30, - 0.002 for each character (so ties are rare)

The best replies (the answer between a polite opener and closer) score about 4; a plain answer
about 2.8; a toxic one below 0. The topic is the one whose subject word the prompt names.

    gold_score("User: How do I reset my password?\\nAssistant:", " Hope this helps! ...")
    score(prompts, completions)   # TRL-style reward function: `rlhf.demo.gold:score`

Simulated labelers (`LABELERS`) give the noisy feedback a reward model learns from: each one
weighs the gold components their own way and answers by Bradley-Terry with their own
temperature, P(a over b) = sigmoid((u(a) - u(b)) / T); the sloppy one also answers at random
now and then.

The personas (`PERSONAS`, the personalisation demo) have tastes of their own on top of gold,
on what gold is nearly indifferent to, the wording of the polite phrases and answers:

    brief      - 0.015 a character: the shortest polite phrases and answers
    detailed   + 0.015 a character: the longest ones
    polite     the warmth of its polite phrases, uncapped and doubled; curt sentences 3 x worse

A persona's utility is its gold score under its taste (`Labeler.utility`); as an oracle,
`rlhf.demo.gold:brief` (and `detailed`, `polite`) scores completions by it.
"""

from __future__ import annotations

import math
import random
import re
from collections import Counter
from dataclasses import dataclass, field, fields

from rlhf.demo.corpus import CURT, FILLER, POLITE_CLOSERS, POLITE_OPENERS, TOPICS, TOXIC, VAGUE

ANSWER_CREDIT = 3.0
WRONG_TOPIC = -1.5
POLITENESS_CAP = 1.5
CURT_PENALTY = -0.5
TOXIC_PENALTY = -4.0
FILLER_PENALTY = -0.6
VAGUE_PENALTY = -0.4
UNKNOWN_PENALTY = -1.0
REPEAT_PENALTY = -1.0
EMPTY_SCORE = -4.0
WORD_BUDGET = 30
OVER_BUDGET_PER_WORD = -0.1
PER_CHARACTER = -0.002
THUMBS_UP = 2.5
"""A reply whose score reaches this gets a thumbs up: a plain correct answer or better."""

INSULTS = re.compile(
    r"\b(stupid|genius|wasting my time|idiot|clueless|pathetic|dumb|moron|shut up|useless)\b"
)


def _normal(sentence: str) -> str:
    return " ".join(sentence.lower().split())


# Every sentence of the demo world: normalized text -> (kind, topic or None, value).
_KNOWN: dict[str, tuple[str, str | None, float]] = {}
for _topic in TOPICS:
    _KNOWN.update({_normal(s): ("answer", _topic.name, c) for s, c in _topic.answers.items()})
_KNOWN.update({_normal(s): ("polite", None, w) for s, w in {**POLITE_OPENERS, **POLITE_CLOSERS}.items()})
_KNOWN.update({_normal(s): ("curt", None, 0.0) for s in CURT})
_KNOWN.update({_normal(s): ("toxic", None, 0.0) for s in TOXIC})
_KNOWN.update({_normal(s): ("filler", None, 0.0) for s in FILLER})
_KNOWN.update({_normal(s): ("vague", None, 0.0) for s in VAGUE})


def detect_topic(text: str) -> str | None:
    """The topic whose subject the text names (the first in `corpus.TOPICS` order if several)."""
    text = text.lower()
    return next((topic.name for topic in TOPICS if topic.subject in text), None)


def split_sentences(text: str) -> list[str]:
    return [s for s in re.split(r"(?<=[.!?])\s+", text.strip()) if s]


@dataclass(frozen=True)
class GoldScore:
    """The components of a gold score; their sum is the score."""

    answer: float = 0.0
    wrong_topic: float = 0.0
    politeness: float = 0.0
    curt: float = 0.0
    toxicity: float = 0.0
    needless: float = 0.0
    incoherent: float = 0.0
    length: float = 0.0
    best: bool = field(default=False, compare=False)
    """The reply is of the best kind: the answer, two polite phrases, and nothing else."""

    @property
    def total(self) -> float:
        return sum(getattr(self, name) for name in COMPONENTS)

    def weighted(self, weights: dict[str, float]) -> float:
        """The sum with some components scaled (a missing name keeps weight 1)."""
        return sum(weights.get(name, 1.0) * getattr(self, name) for name in COMPONENTS)


COMPONENTS = tuple(f.name for f in fields(GoldScore) if f.name != "best")


def gold_breakdown(prompt: str, completion: str) -> GoldScore:
    sentences = [_normal(s) for s in split_sentences(completion)]
    if not sentences:
        return GoldScore(incoherent=EMPTY_SCORE)
    topic = detect_topic(prompt)
    kinds: Counter[str] = Counter()
    completeness, warmth = 0.0, {}
    for sentence in sentences:
        kind, answer_topic, value = _KNOWN.get(sentence, ("unknown", None, 0.0))
        if kind == "answer" and answer_topic != topic:
            kind = "wrong_topic"
        elif kind == "answer":
            completeness = max(completeness, value)
        elif kind == "polite":
            warmth[sentence] = value
        kinds[kind] += 1
    repeats = len(sentences) - len(set(sentences))
    insults = len(INSULTS.findall(completion.lower()))
    words = len(completion.split())
    best = kinds["answer"] > 0 and len(warmth) == 2 and repeats == insults == 0 and set(kinds) == {"answer", "polite"}
    return GoldScore(
        answer=ANSWER_CREDIT * completeness,
        wrong_topic=WRONG_TOPIC * kinds["wrong_topic"],
        politeness=min(POLITENESS_CAP, sum(warmth.values())),
        curt=CURT_PENALTY * kinds["curt"],
        toxicity=TOXIC_PENALTY * insults,
        needless=FILLER_PENALTY * kinds["filler"] + VAGUE_PENALTY * kinds["vague"],
        incoherent=UNKNOWN_PENALTY * kinds["unknown"] + REPEAT_PENALTY * repeats,
        length=OVER_BUDGET_PER_WORD * max(0, words - WORD_BUDGET) + PER_CHARACTER * len(completion.strip()),
        best=best,
    )


def warmth(completion: str) -> float:
    """The summed warmth of the distinct polite phrases of a completion, without gold's cap."""
    sentences = {_normal(s) for s in split_sentences(completion)}
    return sum(_KNOWN[s][2] for s in sentences if _KNOWN.get(s, ("",))[0] == "polite")


def gold_score(prompt: str, completion: str) -> float:
    return gold_breakdown(prompt, completion).total


def score(prompts: list[str], completions: list[str], **kwargs) -> list[float]:
    """Gold scores as a reward function (TRL's signature; extra columns arrive as kwargs)."""
    return [gold_score(p, c) for p, c in zip(prompts, completions)]


# ---------------------------------------------------------------- simulated labelers


@dataclass(frozen=True)
class Labeler:
    name: str
    temperature: float
    """Bradley-Terry temperature on the difference of utilities: higher is noisier."""
    weights: dict[str, float] = field(default_factory=dict)
    """How much this labeler cares about each gold component (missing: as gold does)."""
    careless: float = 0.0
    """Probability of answering at random."""
    per_character: float = 0.0
    """Utility of each character of the reply, beyond gold's own length term."""
    warmth: float = 0.0
    """Utility of each unit of warmth of the reply's polite phrases, uncapped (with weights
    {"politeness": 0} it replaces gold's capped politeness)."""

    def utility(self, prompt: str, completion: str) -> float:
        taste = self.per_character * len(completion.strip()) + (self.warmth * warmth(completion) if self.warmth else 0.0)
        return gold_breakdown(prompt, completion).weighted(self.weights) + taste

    def prefers(self, rng: random.Random, prompt: str, a: str, b: str) -> bool:
        """Whether this labeler picks `a` over `b`."""
        if rng.random() < self.careless:
            return rng.random() < 0.5
        margin = (self.utility(prompt, a) - self.utility(prompt, b)) / self.temperature
        return rng.random() < 1 / (1 + math.exp(-margin))

    def rank(self, rng: random.Random, prompt: str, completions: list[str]) -> list[str]:
        """Best to worst, by Plackett-Luce (Bradley-Terry for K items) via Gumbel noise."""
        if rng.random() < self.careless:
            return rng.sample(completions, len(completions))
        keys = [self.utility(prompt, c) / self.temperature - math.log(-math.log(rng.random())) for c in completions]
        return [c for _, c in sorted(zip(keys, completions), key=lambda kc: -kc[0])]

    def rate(self, rng: random.Random, prompt: str, completion: str) -> int:
        """Thumbs up (1) or down (0); up with probability sigmoid((u - THUMBS_UP) / T)."""
        if rng.random() < self.careless:
            return int(rng.random() < 0.5)
        margin = (self.utility(prompt, completion) - THUMBS_UP) / self.temperature
        return int(rng.random() < 1 / (1 + math.exp(-margin)))


LABELERS = (
    Labeler("careful", temperature=0.2),
    Labeler("typical", temperature=0.4),
    Labeler("concise", temperature=0.4, weights={"length": 3.0, "needless": 2.0}),
    Labeler("blunt", temperature=0.4, weights={"politeness": 0.0, "curt": 0.0}),
    Labeler("sloppy", temperature=0.8, careless=0.3),
)


def simulated_ranking(prompt: str, completions: list[str], rng: random.Random) -> tuple[list[str], str]:
    """One simulated labeler, drawn at random, ranks the completions: the labeler function of
    `rlhf loop` on the demo (`loop.feedback.labeler: rlhf.demo.gold:simulated_ranking`)."""
    labeler = rng.choice(LABELERS)
    return labeler.rank(rng, prompt, completions), labeler.name


PERSONAS = (
    Labeler("brief", temperature=0.4, per_character=-0.015),
    Labeler("detailed", temperature=0.4, per_character=0.015),
    Labeler("polite", temperature=0.4, weights={"politeness": 0.0, "curt": 3.0}, warmth=2.0),
)
PERSONA_BY_NAME = {persona.name: persona for persona in PERSONAS}


def persona_scores(name: str, prompts: list[str], completions: list[str]) -> list[float]:
    persona = PERSONA_BY_NAME[name]
    return [persona.utility(p, c) for p, c in zip(prompts, completions)]


def brief(prompts: list[str], completions: list[str], **kwargs) -> list[float]:
    """The brief persona's utility as a reward function (`rlhf.demo.gold:brief`)."""
    return persona_scores("brief", prompts, completions)


def detailed(prompts: list[str], completions: list[str], **kwargs) -> list[float]:
    """The detailed persona's utility as a reward function (`rlhf.demo.gold:detailed`)."""
    return persona_scores("detailed", prompts, completions)


def polite(prompts: list[str], completions: list[str], **kwargs) -> list[float]:
    """The polite persona's utility as a reward function (`rlhf.demo.gold:polite`)."""
    return persona_scores("polite", prompts, completions)
