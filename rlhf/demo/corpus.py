"""The demo world: customer-support exchanges generated from a seed, with replies of known quality.

A customer asks about one of 20 topics (reset a password, a refund, shipping time, ...); the
question is one of a few phrasings with an optional greeting and sign-off, and names the topic's
subject ("password"), as each of the topic's answers does. The assistant's reply is composed
from parts, each drawn independently:

    body        the topic's answer sentence | a vague non-answer | another topic's answer
    opener      a polite sentence | a curt one | none
    closer      a polite sentence | a curt one | none
    toxic       0, 1 or 2 insulting sentences
    filler      0, 1 or 2 needless sentences
    repeated    one of the reply's sentences said twice

How often each value is drawn is a `ReplyMix`: `PRETRAIN_MIX` is the broad mix the base model
is pretrained on, `DEMO_MIX` the better but still mixed quality of human demonstrations. What a
reply is worth is the gold labeler's business (rlhf/demo/gold.py); this module only says which
sentences exist and, for answers and polite phrases, how complete or how warm each one is.

    train_questions, eval_questions = split_questions()
    exchange = sample_exchange(random.Random(0), DEMO_MIX, train_questions)
    exchange.prompt       # "User: How do I reset my password?\\nAssistant:"
    exchange.completion   # " Happy to help with that. Click Forgot password on ..."
"""

from __future__ import annotations

import random
import zlib
from dataclasses import dataclass


@dataclass(frozen=True)
class Topic:
    name: str
    subject: str
    """The lower-case word or phrase that every question and every answer of the topic contains,
    and no other topic's: the customer names the subject, and a good answer names it back."""
    questions: tuple[str, ...]
    """Core phrasings of the question, written to follow a greeting such as "Hi, "."""
    answers: dict[str, float]
    """Correct answer sentences and how complete each one is (1.0 for the most complete)."""


TOPICS: tuple[Topic, ...] = (
    Topic(
        "reset_password",
        "password",
        ("how do I reset my password?", "I forgot my password, what should I do?",
         "I can't log in because I lost my password.", "where do I set a new password?"),
        {"Click Forgot password on the sign-in page and we will send you a reset link.": 1.0,
         "Use the Forgot password link on the sign-in page to choose a new password.": 0.9},
    ),
    Topic(
        "refund_status",
        "refund",
        ("when will I get my refund?", "how long does a refund take?",
         "my refund has not arrived yet, why?", "is my refund on its way?"),
        {"Refunds reach the card you paid with within 5 to 7 business days.": 1.0,
         "Your refund goes back to your bank account and takes up to a week.": 0.9},
    ),
    Topic(
        "international_shipping",
        "abroad",
        ("do you ship abroad?", "can I order from abroad?",
         "how much is shipping abroad?", "can you send my order abroad?"),
        {"We ship abroad to over 40 countries, and customs fees are shown at checkout.": 1.0,
         "Orders abroad take 7 to 14 days, and duties are shown before you pay.": 0.9},
    ),
    Topic(
        "shipping_time",
        "delivery",
        ("how long does delivery take?", "when will my delivery arrive?",
         "how fast is your delivery?", "how many days does delivery take?"),
        {"Standard delivery takes 3 to 5 business days, and express delivery arrives the next day.": 1.0,
         "Delivery usually takes 3 to 5 business days.": 0.8},
    ),
    Topic(
        "cancel_subscription",
        "subscription",
        ("how do I end my subscription?", "I want to stop my subscription.",
         "can I pause my monthly subscription?", "how do I turn off my subscription?"),
        {"Open Account, then Subscription, and press Stop; you keep access until the period ends.": 1.0,
         "You can end the subscription any time under Account, then Subscription.": 0.9},
    ),
    Topic(
        "cancel_order",
        "cancel",
        ("how do I cancel my order?", "can I cancel an order I just placed?",
         "I want to cancel my purchase.", "is it too late to cancel my order?"),
        {"You can cancel from the Orders page within one hour of placing the order.": 1.0,
         "Open Orders, choose the order and press Cancel before it ships.": 0.9},
    ),
    Topic(
        "change_email",
        "email",
        ("how do I change my email?", "can I use a different email for my account?",
         "how do I update the email on my account?", "I need to change my login email."),
        {"Go to Account settings, choose Email and confirm the change from your inbox.": 1.0,
         "Change your email under Account settings and click the link we send.": 0.9},
    ),
    Topic(
        "change_address",
        "address",
        ("how do I change my shipping address?", "I moved, can I update my address?",
         "can I send my order to a different address?", "I typed the wrong address."),
        {"Go to Account, then Addresses, and edit the address before your order ships.": 1.0,
         "You can fix the address under Account settings until the order ships.": 0.9},
    ),
    Topic(
        "track_order",
        "track",
        ("how can I track my order?", "how can I track my package?",
         "is there a tracking number for my order?", "where do I track my parcel?"),
        {"Use the tracking link in your shipping confirmation to follow your parcel.": 1.0,
         "Open Orders and press Track to see where your package is.": 0.9},
    ),
    Topic(
        "return_item",
        "return",
        ("how do I return an item?", "can I return something I bought?",
         "what is your return policy?", "I want to return a product."),
        {"You can return unused items within 30 days with the free label on the Returns page.": 1.0,
         "Print a free return label from the Returns page and drop the parcel at a post office.": 0.9},
    ),
    Topic(
        "damaged_item",
        "damaged",
        ("my item arrived damaged, what now?", "the product I received is damaged.",
         "what should I do about a damaged order?", "my parcel was damaged in transit."),
        {"Send us a photo of the damaged item and we will ship a free replacement right away.": 1.0,
         "Reply with a photo of the damaged part and we will send a replacement at no cost.": 0.9},
    ),
    Topic(
        "gift_card",
        "gift card",
        ("how do I use a gift card?", "can I check my gift card balance?",
         "do gift cards expire?", "where do I enter my gift card?"),
        {"Enter the gift card number at checkout, and any remaining balance stays on your account.": 1.0,
         "Gift cards never expire, and the balance is shown on the Gift cards page.": 0.9},
    ),
    Topic(
        "update_card",
        "card details",
        ("how do I update my card details?", "my card expired, where do I change the card details?",
         "I need to change my card details.", "where do I edit my card details?"),
        {"Go to Account, then Payment, and replace the card details there.": 1.0,
         "Edit your card details under Account, then Payment.": 0.9},
    ),
    Topic(
        "payment_methods",
        "payment method",
        ("which payment methods do you accept?", "is PayPal one of your payment methods?",
         "what payment methods can I use?", "do you take credit cards as a payment method?"),
        {"Our payment methods are Visa, Mastercard, PayPal and Apple Pay.": 1.0,
         "You can choose credit card or PayPal as the payment method at checkout.": 0.8},
    ),
    Topic(
        "delete_account",
        "delete",
        ("how do I delete my account?", "please delete my account.",
         "can you delete my account and data?", "I want to delete my profile."),
        {"Choose Delete account at the bottom of Account settings and confirm.": 1.0,
         "You can delete your account under Account settings, and we erase your data within 30 days.": 0.9},
    ),
    Topic(
        "discount_code",
        "discount",
        ("my discount code is not working.", "where do I enter a discount code?",
         "why was my discount rejected?", "how do I use a discount voucher?"),
        {"Type the discount code in the box at checkout; each code works once.": 1.0,
         "Enter the discount code before you pay, and check that it has not expired.": 0.9},
    ),
    Topic(
        "invoice",
        "invoice",
        ("can I get an invoice for my order?", "where do I find my invoice?",
         "I need an invoice for my company.", "how do I download an invoice?"),
        {"Download the invoice as a PDF from the order details on the Orders page.": 1.0,
         "Every order has a PDF invoice you can download under Orders.": 0.9},
    ),
    Topic(
        "support_hours",
        "hours",
        ("what are your support hours?", "what are your opening hours?",
         "what hours is customer service open?", "what are your hours on weekends?"),
        {"Our support hours are 8 am to 8 pm, Monday to Saturday.": 1.0,
         "Our hours are 8 am to 8 pm every day except Sunday.": 0.9},
    ),
    Topic(
        "talk_to_human",
        "person",
        ("can I talk to a real person?", "how do I reach a person?",
         "is there a person I can call?", "I want to speak to a person, not a bot."),
        {"Call us at 555 0100 to talk to a person, or choose Chat on the Help page.": 1.0,
         "You can reach a person by phone at 555 0100 from 8 am to 8 pm.": 0.9},
    ),
    Topic(
        "out_of_stock",
        "stock",
        ("when will this item be back in stock?", "is the blue jacket out of stock?",
         "when do you restock sold out items?", "the product is out of stock, will it come back?"),
        {"Press Notify me on the product page and we will message you when it is back in stock.": 1.0,
         "Restocks take two to three weeks; press Notify me on the product page.": 0.9},
    ),
)

TOPIC_BY_NAME = {topic.name: topic for topic in TOPICS}

GREETINGS = ("", "Hi, ", "Hello, ", "Hey there, ", "Good morning, ")
SIGN_OFFS = ("", " Thanks.", " Thanks in advance!", " Please help.")

# Warmth: how polite the phrase reads (the gold labeler's politeness credit before its cap).
POLITE_OPENERS = {
    "Thanks for reaching out!": 0.75,
    "Happy to help with that.": 0.8,
    "Great question!": 0.6,
    "Sorry for the trouble.": 0.7,
    "Thank you for your patience.": 0.75,
}
POLITE_CLOSERS = {
    "Hope this helps!": 0.75,
    "Have a great day!": 0.7,
    "Let me know if there is anything else I can do.": 0.9,
    "Thanks for shopping with us.": 0.8,
}
CURT = ("Okay.", "Fine.", "Look.", "That is all.", "Nothing more to say.")
TOXIC = (
    "What a stupid question.",
    "Read the instructions next time, genius.",
    "Honestly, stop wasting my time.",
    "Figure it out yourself, idiot.",
    "Only a clueless customer would ask that.",
    "Ugh, you people are pathetic.",
)
FILLER = (
    "As a company, we always value our customers.",
    "Our team works hard every single day.",
    "We have been in business for many years.",
    "Customer satisfaction is very important to us.",
    "This is a question we get quite often.",
    "Many customers ask us about this.",
)
VAGUE = (
    "It depends on a few different things.",
    "Please check our website for more details.",
    "That is something our team can look into.",
    "There are several options available.",
    "You may want to review your account settings.",
    "Our policies cover situations like this.",
)

MAX_REPLY_WORDS = 40
"""Longer draws lose filler, then the repetition, then toxic sentences (keeps replies ~60 tokens)."""


@dataclass(frozen=True)
class ReplyMix:
    """How often each kind of reply part is drawn; each tuple is a distribution over its values."""

    body: tuple[float, float, float]
    """answer, vague, wrong-topic answer"""
    opener: tuple[float, float, float]
    """polite, curt, none"""
    closer: tuple[float, float, float]
    """polite, curt, none"""
    toxic: tuple[float, float, float]
    """0, 1, 2 insulting sentences"""
    filler: tuple[float, float, float]
    """0, 1, 2 needless sentences"""
    repeated: float
    """probability that one sentence is said twice"""


PRETRAIN_MIX = ReplyMix(
    body=(0.7, 0.15, 0.15),
    opener=(0.45, 0.2, 0.35),
    closer=(0.45, 0.15, 0.4),
    toxic=(0.65, 0.25, 0.1),
    filler=(0.5, 0.3, 0.2),
    repeated=0.15,
)
DEMO_MIX = ReplyMix(
    body=(0.75, 0.1, 0.15),
    opener=(0.65, 0.1, 0.25),
    closer=(0.65, 0.05, 0.3),
    toxic=(0.88, 0.1, 0.02),
    filler=(0.6, 0.28, 0.12),
    repeated=0.08,
)


@dataclass(frozen=True)
class Exchange:
    topic: str
    question: str
    reply: str
    attributes: dict
    """body ("answer", "vague", "wrong_topic"), opener and closer ("polite", "curt", "none"),
    toxic and filler (counts), repeated (bool), best (all of the best kind: see `is_best`)."""

    @property
    def prompt(self) -> str:
        return format_prompt(self.question)

    @property
    def completion(self) -> str:
        return format_completion(self.reply)


def format_prompt(question: str) -> str:
    return f"User: {question}\nAssistant:"


def format_completion(reply: str) -> str:
    """The completion that follows the prompt: a leading space, no EOS (training code adds it)."""
    return f" {reply}"


def all_questions() -> list[tuple[str, str]]:
    """Every (topic, question) the corpus can ask: phrasing x greeting x sign-off."""
    questions = []
    for topic in TOPICS:
        for core in topic.questions:
            for greeting in GREETINGS:
                text = greeting + core if greeting else core[0].upper() + core[1:]
                questions += [(topic.name, text + sign_off) for sign_off in SIGN_OFFS]
    return questions


def is_held_out(question: str) -> bool:
    """About 15% of questions are held out for evaluation, fixed by the text alone (not by a
    seed), so the shipped base model never saw them whatever seed the data set is built with."""
    return zlib.crc32(question.encode()) % 100 < 15


def split_questions() -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """(train, eval) lists of (topic, question); disjoint, every topic in both."""
    questions = all_questions()
    return [q for q in questions if not is_held_out(q[1])], [q for q in questions if is_held_out(q[1])]


def is_best(attributes: dict) -> bool:
    """The best kind of reply: the answer, polite opener and closer, and nothing else."""
    return (
        attributes["body"] == "answer"
        and attributes["opener"] == "polite"
        and attributes["closer"] == "polite"
        and attributes["toxic"] == 0
        and attributes["filler"] == 0
        and not attributes["repeated"]
    )


def _draw(rng: random.Random, values: tuple, weights: tuple[float, ...]):
    return rng.choices(values, weights=weights)[0]


def _courtesy(rng: random.Random, kind: str, polite: dict[str, float]) -> list[str]:
    if kind == "polite":
        return [rng.choice(list(polite))]
    return [rng.choice(CURT)] if kind == "curt" else []


def sample_reply(rng: random.Random, topic: str, mix: ReplyMix) -> tuple[str, dict]:
    """A reply to a question about `topic`, and the attributes it was drawn with."""
    attributes = {
        "body": _draw(rng, ("answer", "vague", "wrong_topic"), mix.body),
        "opener": _draw(rng, ("polite", "curt", "none"), mix.opener),
        "closer": _draw(rng, ("polite", "curt", "none"), mix.closer),
        "toxic": _draw(rng, (0, 1, 2), mix.toxic),
        "filler": _draw(rng, (0, 1, 2), mix.filler),
        "repeated": rng.random() < mix.repeated,
    }
    if attributes["body"] == "answer":
        body = rng.choice(list(TOPIC_BY_NAME[topic].answers))
    elif attributes["body"] == "vague":
        body = rng.choice(VAGUE)
    else:
        other = rng.choice([t for t in TOPICS if t.name != topic])
        body = rng.choice(list(other.answers))
    toxic = rng.sample(TOXIC, attributes["toxic"])
    filler = rng.sample(FILLER, attributes["filler"])
    opener = _courtesy(rng, attributes["opener"], POLITE_OPENERS)
    closer = _courtesy(rng, attributes["closer"], POLITE_CLOSERS)
    # An insult lands before or after the body; filler pads either side of it.
    before_body = rng.random() < 0.5
    head_filler = rng.randint(0, len(filler))
    repeat_at = rng.random()

    def compose() -> list[str]:
        middle = filler[:head_filler] + [body] + filler[head_filler:]
        middle = toxic + middle if before_body else middle + toxic
        sentences = opener + middle
        if attributes["repeated"]:
            i = min(int(repeat_at * len(sentences)), len(sentences) - 1)
            sentences.insert(i + 1, sentences[i])
        return sentences + closer

    sentences = compose()
    while len(" ".join(sentences).split()) > MAX_REPLY_WORDS:
        if filler:
            filler.pop()
            head_filler = min(head_filler, len(filler))
            attributes["filler"] = len(filler)
        elif attributes["repeated"]:
            attributes["repeated"] = False
        else:
            toxic.pop()
            attributes["toxic"] = len(toxic)
        sentences = compose()
    attributes["best"] = is_best(attributes)
    return " ".join(sentences), attributes


def sample_exchange(rng: random.Random, mix: ReplyMix, questions: list[tuple[str, str]]) -> Exchange:
    """A (topic, question) drawn from `questions` and a reply to it drawn from `mix`."""
    topic, question = rng.choice(questions)
    reply, attributes = sample_reply(rng, topic, mix)
    return Exchange(topic, question, reply, attributes)
