"""DPO: the losses on hand-computed numbers, completion log-probs, the reference, learning, resume, config."""

from __future__ import annotations

import json
import math
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from conftest import TOPICS, conversation_for, prompt_for, write_jsonl
from rlhf import dpo, ops, reward
from rlhf.config import ConfigError, load_recipe
from rlhf.data import Comparison, Rating, load_feedback
from rlhf.models import LoraConfig, add_lora, load_causal_lm, load_tokenizer
from rlhf.pipeline import Recipe
from rlhf.tracking import read_metrics
from rlhf.training import DataConfig, OptimConfig

ROOT = Path(__file__).resolve().parent.parent


def log_sigmoid(x: float) -> float:
    return -math.log1p(math.exp(-x))


# ---------------------------------------------------------------- the losses


def test_losses_match_hand_computed_numbers():
    # Two pairs. Pair 0: the policy gained 1 nat on chosen and lost 1 on rejected against the
    # reference, h = 1 - (-1) = 2. Pair 1: -2 on chosen, +0.5 on rejected, h = -2.5.
    chosen, rejected = torch.tensor([-2.0, -6.0]), torch.tensor([-5.0, -3.5])
    ref_chosen, ref_rejected = torch.tensor([-3.0, -4.0]), torch.tensor([-4.0, -4.0])

    losses, chosen_rewards, rejected_rewards = ops.dpo_loss(chosen, rejected, ref_chosen, ref_rejected, beta=0.5)
    # -log sigmoid(0.5 * 2) = log(1 + e^-1) = 0.313262; -log sigmoid(0.5 * -2.5) = log(1 + e^1.25) = 1.501929
    assert losses.tolist() == pytest.approx([0.3132617, 1.5019291], abs=1e-6)
    assert chosen_rewards.tolist() == pytest.approx([0.5, -1.0])  # 0.5 * (-2 + 3), 0.5 * (-6 + 4)
    assert rejected_rewards.tolist() == pytest.approx([-0.5, 0.25])  # 0.5 * (-5 + 4), 0.5 * (-3.5 + 4)

    # IPO: (h - 1 / (2 * 0.5))^2 = (2 - 1)^2 = 1 and (-2.5 - 1)^2 = 12.25
    losses, _, _ = ops.dpo_loss(chosen, rejected, ref_chosen, ref_rejected, beta=0.5, variant="ipo")
    assert losses.tolist() == pytest.approx([1.0, 12.25])
    # beta 0.25 aims at a margin of 2: pair 0 sits on it
    losses, _, _ = ops.dpo_loss(chosen, rejected, ref_chosen, ref_rejected, beta=0.25, variant="ipo")
    assert losses.tolist() == pytest.approx([0.0, 20.25])  # (-2.5 - 2)^2

    # SimPO on average log-probs, no reference: chosen -2 over 4 tokens = -0.5, rejected -5 over
    # 4 tokens = -1.25; beta 2, gamma 1: -log sigmoid(2 * 0.75 - 1) = log(1 + e^-0.5) = 0.474077
    average, zero = torch.tensor([-0.5]), torch.zeros(1)
    losses, chosen_rewards, rejected_rewards = ops.dpo_loss(average, torch.tensor([-1.25]), zero, zero, beta=2.0, variant="simpo", gamma=1.0)
    assert losses.tolist() == pytest.approx([0.4740770], abs=1e-6)
    assert (chosen_rewards.item(), rejected_rewards.item()) == pytest.approx((-1.0, -2.5))


@pytest.mark.parametrize("variant", ["sigmoid", "ipo", "simpo"])
def test_losses_match_a_slow_loop_over_pairs(variant):
    g = torch.Generator().manual_seed(0)
    chosen, rejected, ref_chosen, ref_rejected = (-10 * torch.rand(7, generator=g, dtype=torch.float64) for _ in range(4))
    if variant == "simpo":  # reference-free: the caller passes zeros, as dpo.batch_loss does
        ref_chosen, ref_rejected = torch.zeros(7, dtype=torch.float64), torch.zeros(7, dtype=torch.float64)
    beta, gamma = 0.3, (0.4 if variant == "simpo" else 0.0)
    losses, chosen_rewards, rejected_rewards = ops.dpo_loss(chosen, rejected, ref_chosen, ref_rejected, beta, variant, gamma)
    for i in range(7):
        c, r, rc, rr = chosen[i].item(), rejected[i].item(), ref_chosen[i].item(), ref_rejected[i].item()
        margin = (c - rc) - (r - rr)
        if variant == "sigmoid":
            expected = -log_sigmoid(beta * margin)
        elif variant == "ipo":
            expected = (margin - 1 / (2 * beta)) ** 2
        else:
            expected = -log_sigmoid(beta * (c - r) - gamma)
        assert losses[i].item() == pytest.approx(expected, abs=1e-9)
        assert chosen_rewards[i].item() == pytest.approx(beta * (c - rc), abs=1e-9)
        assert rejected_rewards[i].item() == pytest.approx(beta * (r - rr), abs=1e-9)


def test_an_unknown_variant_is_refused():
    x = torch.zeros(1)
    with pytest.raises(ValueError, match="unknown DPO variant 'kto'"):
        ops.dpo_loss(x, x, x, x, 0.1, "kto")


# ---------------------------------------------------------------- completion log-probs


class FixedLogits(torch.nn.Module):
    def __init__(self, logits):
        super().__init__()
        self.logits = logits

    def forward(self, input_ids, attention_mask, position_ids):
        return type("Out", (), {"logits": self.logits})()


def test_sequence_logprob_sums_completion_tokens_only():
    # Row 0: prompt 0 1, completion 2 3. Row 1: prompt 0 1, completion 2, then padding (id 3).
    ids = torch.tensor([[0, 1, 2, 3], [0, 1, 2, 3]])
    attention = torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0]])
    response = torch.tensor([[0, 0, 1, 1], [0, 0, 1, 0]])
    logits = torch.zeros(2, 4, 4)
    logits[:, 0, 0] = 50.0  # position 0 predicts prompt token 1 badly: masked, must not count
    logits[:, 2, 3] = math.log(3)  # position 2 predicts token 3 with probability 3 / 6
    logits[1, 3, :] = torch.tensor([0.0, 0.0, 0.0, -50.0])  # after the last token: never scored
    logps = dpo.sequence_logprobs(FixedLogits(logits), ids, attention, response)
    # row 0: token 2 under uniform logits, log(1/4), and token 3 at 1/2; row 1: token 2 alone
    assert logps.tolist() == pytest.approx([math.log(1 / 4) + math.log(1 / 2), math.log(1 / 4)], abs=1e-5)
    response[0, 1] = 1  # a prompt token in the mask would count: the mask is what decides
    assert dpo.sequence_logprobs(FixedLogits(logits), ids, attention, response)[0].item() < -40


def slow_completion_logprob(model, prompt_ids: list[int], completion_ids: list[int]) -> float:
    """log pi(completion | prompt), one sequence through the model with no padding, token by token."""
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([prompt_ids + completion_ids])).logits[0]
    total = 0.0
    for k, token in enumerate(completion_ids):
        position = len(prompt_ids) + k - 1
        total += torch.log_softmax(logits[position].double(), -1)[token].item()
    return total


def test_completion_logprobs_do_not_depend_on_padding(tiny_model_dir):
    tokenizer = load_tokenizer(str(tiny_model_dir))
    model = load_causal_lm(str(tiny_model_dir), tokenizer).eval()
    short = Comparison(prompt_for("refund"), [" Refunds reach your card.", " No."], "a:1")
    long = Comparison(prompt_for("shipping"), [" Standard shipping takes three days. Happy to help.", " Whatever."], "a:2")
    examples = [dpo.encode_comparison(tokenizer, r, 64) for r in (short, long)]
    with torch.no_grad():
        together = dpo.completion_logprobs(model, examples, tokenizer.pad_token_id, "cpu", chunk=4)
        alone = torch.cat([dpo.completion_logprobs(model, [e], tokenizer.pad_token_id, "cpu", chunk=1) for e in examples])
    expected = [slow_completion_logprob(model, s[: e.prompt_length], s[e.prompt_length :]) for e in examples for s in e.sequences]
    assert together.tolist() == pytest.approx(expected, abs=1e-4)
    assert alone.tolist() == pytest.approx(expected, abs=1e-4)

    # Left padding (positions counted from the first real token) gives the same as right padding.
    sequences = [s for e in examples for s in e.sequences]
    starts = [e.prompt_length for e in examples for _ in e.sequences]
    for side in ("left", "right"):
        from rlhf.encoding import pad

        ids, attention = pad(sequences, tokenizer.pad_token_id, side=side)
        response = attention.clone()
        for row, (s, start) in enumerate(zip(sequences, starts)):
            offset = ids.shape[1] - len(s) if side == "left" else 0
            response[row, : offset + start] = 0
        with torch.no_grad():
            logps = dpo.sequence_logprobs(model, ids, attention, response)
        assert logps.tolist() == pytest.approx(expected, abs=1e-4), side


def test_encoding_is_the_reward_models(tiny_model_dir, chat_model_dir):
    # The sequences DPO trains on are those the reward model reads, for strings and conversations.
    for path, prompt, completions in (
        (tiny_model_dir, prompt_for("refund"), [" Refunds reach your card.", " Whatever."]),
        (chat_model_dir, conversation_for("refund"), [[{"role": "assistant", "content": "Refunds reach your card."}], "Whatever."]),
    ):
        tokenizer = load_tokenizer(str(path))
        record = Comparison(prompt, completions, "a:1")
        example = dpo.encode_comparison(tokenizer, record, 128)
        assert example.sequences == reward.encode_feedback(tokenizer, record, 128).sequences
        prompt_ids = example.sequences[0][: example.prompt_length]
        assert all(s[: example.prompt_length] == prompt_ids for s in example.sequences)
        assert example.pairs == [(0, 1)]


def test_rankings_and_ratings_become_pairs_and_each_record_weighs_once(tiny_model_dir):
    tokenizer = load_tokenizer(str(tiny_model_dir))
    model = load_causal_lm(str(tiny_model_dir), tokenizer).eval()
    ranking = Comparison(prompt_for("refund"), [" A.", " B b.", " C c c."], "r:1", ranking=True)
    pair = Comparison(prompt_for("invoice"), [" D.", " E e."], "p:1")
    ratings = [Rating(prompt_for("password"), text, label, f"t:{i}") for i, (text, label) in enumerate([(" F.", 1.0), (" G.", 0.0), (" H.", 1.0)])]
    units = dpo.feedback_units([ranking, pair, *ratings, Rating(prompt_for("shipping"), " I.", 1.0, "t:9")])
    assert units[:2] == [ranking, pair] and units[2] == ratings and len(units) == 3  # the lone rating gives no pair
    examples = [dpo.encode_comparison(tokenizer, u, 64) for u in units[:2]] + [dpo.encode_ratings(tokenizer, units[2], 64)]
    assert [e.pairs for e in examples] == [[(0, 1), (0, 2), (1, 2)], [(0, 1)], [(0, 1), (2, 1)]]
    assert [e.records for e in examples] == [1, 1, 3]

    # The loss over the batch, by hand: each pair's DPO loss against a reference 1, 0 and 0.4
    # nats below the policy on the first, second and third completion of each example, each
    # example's pairs averaged, the examples averaged over n_global = 4 (one is elsewhere).
    policy = [[slow_completion_logprob(model, s[: e.prompt_length], s[e.prompt_length :]) for s in e.sequences] for e in examples]
    below = [1.0, 0.0, 0.4]
    for e, logps in zip(examples, policy):
        e.ref_logps = torch.tensor([x - below[k] for k, x in enumerate(logps)])
    beta = 0.5
    per_example = []
    for e, logps in zip(examples, policy):
        losses = []
        for b, w in e.pairs:
            h = (logps[b] - e.ref_logps[b].item()) - (logps[w] - e.ref_logps[w].item())
            losses.append(-log_sigmoid(beta * h))
        per_example.append(sum(losses) / len(losses))
    with torch.no_grad():
        loss, stats = dpo.batch_loss(model, examples, tokenizer.pad_token_id, "cpu", dpo.LossConfig(beta=beta), n_global=4)
    assert loss.item() == pytest.approx(sum(per_example) / 4, abs=1e-5)
    # The implicit rewards are beta * below = 0.5, 0 and 0.2. Ranking: pairs (0, 1), (0, 2), (1, 2),
    # chosen 0.5, 0.5, 0; rejected 0, 0.2, 0.2; right 2 of 3. Pair: 0.5 over 0. Ratings (F 1, G 0,
    # H 1): pairs (0, 1), (2, 1), chosen 0.5 and 0.2 over 0, both right.
    chosen, rejected = (1 / 3 + 0.5 + 0.35) / 4, (0.4 / 3) / 4
    assert stats["rewards/chosen"].item() == pytest.approx(chosen, abs=1e-5)
    assert stats["rewards/rejected"].item() == pytest.approx(rejected, abs=1e-5)
    assert stats["rewards/margins"].item() == pytest.approx(chosen - rejected, abs=1e-5)
    assert stats["rewards/accuracies"].item() == pytest.approx((2 / 3 + 1 + 1) / 4, abs=1e-6)


def test_simpo_averages_log_probs_over_each_completions_tokens(tiny_model_dir):
    tokenizer = load_tokenizer(str(tiny_model_dir))
    model = load_causal_lm(str(tiny_model_dir), tokenizer).eval()
    record = Comparison(prompt_for("refund"), [" Refunds reach your card within five days.", " No."], "a:1")
    example = dpo.encode_comparison(tokenizer, record, 64)
    completions = [s[example.prompt_length :] for s in example.sequences]
    assert [len(c) for c in completions] == [len(tokenizer(t, add_special_tokens=False)["input_ids"]) + 1 for t in record.completions]  # + EOS
    chosen, rejected = (slow_completion_logprob(model, example.sequences[0][: example.prompt_length], c) / len(c) for c in completions)
    beta, gamma = 2.0, 0.5
    with torch.no_grad():
        loss, stats = dpo.batch_loss(model, [example], tokenizer.pad_token_id, "cpu", dpo.LossConfig("simpo", beta, gamma), n_global=1)
    assert loss.item() == pytest.approx(-log_sigmoid(beta * (chosen - rejected) - gamma), abs=1e-5)
    assert stats["rewards/chosen"].item() == pytest.approx(beta * chosen, abs=1e-5)  # no reference: ref_logps never read


# ---------------------------------------------------------------- the reference


def test_with_lora_the_reference_is_the_policy_with_adapters_off(tiny_model_dir):
    tokenizer = load_tokenizer(str(tiny_model_dir))
    base = load_causal_lm(str(tiny_model_dir), tokenizer).eval()
    policy = add_lora(load_causal_lm(str(tiny_model_dir), tokenizer), LoraConfig(enabled=True, r=4), "CAUSAL_LM")
    with torch.no_grad():
        for name, parameter in policy.named_parameters():
            if "lora_B" in name:  # trained adapters: the policy is no longer the base model
                parameter.normal_(std=0.5)
    example = dpo.encode_comparison(tokenizer, Comparison(prompt_for("refund"), [" Refunds reach your card.", " No."], "a:1"), 64)
    expected = [slow_completion_logprob(base, s[: example.prompt_length], s[example.prompt_length :]) for s in example.sequences]
    dpo.reference_logprobs(policy, [example], tokenizer.pad_token_id, 4, "cpu", False, adapters_off=True)
    assert example.ref_logps.tolist() == pytest.approx(expected, abs=1e-4)
    dpo.reference_logprobs(policy, [example], tokenizer.pad_token_id, 4, "cpu", False, adapters_off=False)
    assert example.ref_logps.tolist() != pytest.approx(expected, abs=1e-2)  # the adapters do change them


# ---------------------------------------------------------------- runs


def _config(model, train, out, **optim) -> dpo.DPOConfig:
    return dpo.DPOConfig(
        policy=str(model),
        output_dir=str(out),
        data=DataConfig(train=[str(train)], eval_fraction=0.1),
        optim=OptimConfig(lr=1e-3, batch_size=8, micro_batch_size=4, **optim),
        eval_every=5,
        save_every=4,
        log_every=1,
        precision="fp32",
    )


def test_smoke_run_changes_the_policy_and_saves_for_plain_transformers(tiny_model_dir, tiny_data, tmp_path):
    path = dpo.train(_config(tiny_model_dir, tiny_data["prefs"], tmp_path / "dpo", max_steps=6))
    metrics = read_metrics(tmp_path / "dpo")
    assert [m["step"] for m in metrics] == list(range(1, 7))
    for key in ("train/loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies"):
        assert all(math.isfinite(m[key]) for m in metrics), key
    # Step 1 runs the policy before any update: it is the reference, every implicit reward 0.
    assert metrics[0]["train/loss"] == pytest.approx(math.log(2), abs=1e-5)
    assert metrics[0]["rewards/chosen"] == metrics[0]["rewards/rejected"] == pytest.approx(0.0, abs=1e-5)
    assert {"eval/loss", "eval/rewards/accuracies", "eval/rewards/margins", "eval/pairs"} <= set(metrics[-1])
    summary = json.loads((tmp_path / "dpo" / "summary.json").read_text())
    assert (summary["train_records"], summary["train_pairs"]) == (116, 116)  # 128 pairs, 12 held out
    assert summary["eval"]["pairs"] == 12

    model = AutoModelForCausalLM.from_pretrained(path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    assert tokenizer.pad_token_id != tokenizer.eos_token_id
    assert (model.transformer.h[0].mlp.c_fc.weight - base.transformer.h[0].mlp.c_fc.weight).abs().max() > 1e-4
    assert torch.isfinite(model(**tokenizer(prompt_for("refund"), return_tensors="pt")).logits).all()


def test_lora_run_loads_the_model_once_and_saves_it_merged(tiny_model_dir, tiny_data, tmp_path, monkeypatch):
    loads = []
    monkeypatch.setattr(dpo, "load_causal_lm", lambda *args, **kwargs: loads.append(args) or load_causal_lm(*args, **kwargs))
    config = _config(tiny_model_dir, tiny_data["prefs"], tmp_path / "lora", max_steps=4)
    config.lora.enabled, config.lora.r = True, 4
    path = dpo.train(config)
    assert len(loads) == 1  # no second copy for the reference
    assert read_metrics(tmp_path / "lora")[0]["train/loss"] == pytest.approx(math.log(2), abs=1e-5)
    assert (path / "adapter" / "adapter_config.json").exists()
    model = AutoModelForCausalLM.from_pretrained(path)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    assert (model.transformer.h[0].attn.c_attn.weight - base.transformer.h[0].attn.c_attn.weight).abs().max() > 1e-5


def polite_pairs(n: int, seed: int) -> list[dict]:
    """The same answer closed politely (chosen) or rudely (rejected): a pattern shared by every chosen."""
    rng = random.Random(seed)
    records = []
    for _ in range(n):
        topic = rng.choice(list(TOPICS))
        records.append({"prompt": prompt_for(topic), "chosen": f" {TOPICS[topic]} Happy to help.", "rejected": f" {TOPICS[topic]} Whatever."})
    return records


def held_out_margins(path, records: list[dict]) -> list[float]:
    """log pi(chosen) - log pi(rejected) per record, by plain transformers, one sequence at a time."""
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    tokenizer = AutoTokenizer.from_pretrained(path)

    def logprob(prompt: str, completion: str) -> float:
        return slow_completion_logprob(model, tokenizer(prompt)["input_ids"], tokenizer(completion, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id])

    return [logprob(r["prompt"], r["chosen"]) - logprob(r["prompt"], r["rejected"]) for r in records]


@pytest.mark.parametrize("variant,beta,gamma", [("sigmoid", 0.1, 0.0), ("ipo", 0.1, 0.0), ("simpo", 2.0, 1.0)])
def test_the_policy_learns_a_preference_it_was_indifferent_to(tiny_sft_dir, tmp_path, variant, beta, gamma):
    # The SFT policy closes politely or rudely half the time each; the pairs prefer polite.
    train, held = polite_pairs(96, 11), polite_pairs(24, 12)
    config = _config(tiny_sft_dir, write_jsonl(tmp_path / "train.jsonl", train), tmp_path / "dpo", epochs=2)
    config.data.eval = [str(write_jsonl(tmp_path / "held.jsonl", held))]
    config.optim.lr, config.eval_every = 1e-3, 1000
    config.loss = dpo.LossConfig(variant=variant, beta=beta, gamma=gamma)
    path = dpo.train(config)

    before, after = held_out_margins(tiny_sft_dir, held), held_out_margins(path, held)
    assert abs(sum(before) / len(before)) < 2.0  # indifferent to begin with
    assert sum(after) / len(after) > sum(before) / len(before) + 3.0
    # Held-out preference accuracy: the policy raised chosen over rejected relative to SFT.
    assert sum(a > b for a, b in zip(after, before)) / len(held) >= 0.9
    assert read_metrics(tmp_path / "dpo")[-1]["eval/rewards/accuracies"] >= 0.9


class Crash(Exception):
    pass


def test_resume_gives_the_same_metrics_as_an_uninterrupted_run(tiny_model_dir, tiny_data, tmp_path, monkeypatch):
    from rlhf.tracking import Tracker

    dpo.train(_config(tiny_model_dir, tiny_data["prefs"], tmp_path / "full", max_steps=10))
    interrupted = _config(tiny_model_dir, tiny_data["prefs"], tmp_path / "part", max_steps=10)
    original = Tracker.log

    def log(self, at, metrics):
        if at == 7:  # checkpoints at 4 (and 8): steps 5-6 were logged, then lost
            raise Crash
        original(self, at, metrics)

    with monkeypatch.context() as patch:
        patch.setattr(Tracker, "log", log)
        with pytest.raises(Crash):
            dpo.train(interrupted)
    interrupted.resume = True
    dpo.train(interrupted)
    a = {m["step"]: m for m in read_metrics(tmp_path / "full")}
    b = {m["step"]: m for m in read_metrics(tmp_path / "part")}
    assert sorted(a) == sorted(b) == list(range(1, 11))
    keys = ("train/loss", "train/lr", "rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "eval/loss", "eval/rewards/margins")
    for step in a:
        for key in keys:
            if key in a[step]:
                assert b[step][key] == pytest.approx(a[step][key], rel=1e-5, abs=1e-6), (step, key)
    assert a[10]["rewards/margins"] != pytest.approx(0.0, abs=1e-4)  # the run has moved off the reference


# ---------------------------------------------------------------- configuration


@pytest.mark.parametrize(
    "override,message",
    [
        ("dpo.loss.variant=kto", "dpo.loss.variant: 'kto' is not one of 'sigmoid', 'ipo', 'simpo'"),
        ("dpo.loss.beta=0", r"dpo.loss.beta: must be > 0, got 0.0"),
        ("dpo.loss.beta=-0.1", r"dpo.loss.beta: must be > 0, got -0.1"),
        ("dpo.loss.gamma=-1", r"dpo.loss.gamma: must be >= 0, got -1.0"),
        ("dpo.optim.lr=0", r"dpo.optim.lr: must be > 0, got 0.0"),
    ],
)
def test_bad_values_name_the_key_and_the_allowed_range(override, message):
    with pytest.raises(ConfigError, match=f"^{message}$"):
        load_recipe(Recipe, None, [override])


def test_a_target_margin_outside_simpo_and_sizes_that_do_not_divide_are_refused():
    config = dpo.DPOConfig(policy="m", data=DataConfig(train=["t.jsonl"]), loss=dpo.LossConfig(gamma=0.5))
    with pytest.raises(ConfigError, match="^dpo.loss.gamma: only the simpo variant"):
        dpo.check_config(config, 1)
    config.loss.variant = "simpo"
    dpo.check_config(config, 1)
    config.optim = OptimConfig(batch_size=12, micro_batch_size=8)
    with pytest.raises(ConfigError, match="^dpo.optim.micro_batch_size: must divide"):
        dpo.check_config(config, 1)
    with pytest.raises(ConfigError, match="^dpo.policy is required"):
        dpo.check_config(dpo.DPOConfig(data=DataConfig(train=["t.jsonl"])), 1)


def test_the_cli_refuses_a_bad_beta_with_exit_code_2_before_any_work(tmp_path):
    command = [sys.executable, "-m", "rlhf", "dpo", "--config", str(ROOT / "recipes" / "demo.yaml"), "dpo.loss.beta=0", f"dpo.output_dir={tmp_path / 'out'}"]
    result = subprocess.run(command, capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == "error: dpo.loss.beta: must be > 0, got 0.0"
    assert not (tmp_path / "out").exists()


def test_the_demo_recipe_has_a_dpo_section_that_starts_from_sft():
    recipe = load_recipe(Recipe, ROOT / "recipes" / "demo.yaml")
    dpo.check_config(recipe.dpo, 1)
    assert recipe.dpo.policy == f"{recipe.sft.output_dir}/model"
    assert recipe.dpo.data.eval == recipe.reward.data.eval


def test_conversational_pairs_train(chat_model_dir, tmp_path):
    from test_reward import conversational_pairs

    config = _config(chat_model_dir, write_jsonl(tmp_path / "train.jsonl", conversational_pairs(24, 7, implicit=True)), tmp_path / "dpo", max_steps=2)
    path = dpo.train(config)
    assert math.isfinite(read_metrics(tmp_path / "dpo")[-1]["train/loss"])
    assert AutoTokenizer.from_pretrained(path).chat_template == AutoTokenizer.from_pretrained(chat_model_dir).chat_template
    records = load_feedback([str(tmp_path / "train.jsonl")])
    assert isinstance(records[0].prompt, list)


def test_bench_times_a_dpo_step_beside_the_reward_models(tmp_path):
    out = tmp_path / "bench.json"
    command = [sys.executable, "-m", "rlhf", "bench", "--batch", "2", "--prompt-tokens", "4", "--new-tokens", "4",
               "--iterations", "1", "--warmup", "0", "--stages", "reward", "dpo", "--json", str(out)]
    result = subprocess.run(command, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    reward_line = next(i for i, line in enumerate(lines) if line.startswith("reward model step (full)"))
    assert lines[reward_line + 1].startswith("DPO step (full)") and "pairs/s" in lines[reward_line + 1] and "tokens/s" in lines[reward_line + 1]
    dpo_result = json.loads(out.read_text())["dpo"]["full"]
    # 2 pairs of prompt (2 to 4 tokens) + 4 new tokens + EOS, 2 sequences each
    assert dpo_result["pairs_per_s"] > 0 and dpo_result["gflop"] > 0
    assert 2 * 2 * (2 + 5) <= dpo_result["tokens_per_s"] * dpo_result["step_s"]["median"] <= 2 * 2 * (4 + 5)
