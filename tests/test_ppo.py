"""PPO: alignment of log-probs and values, invariances, learning, the KL guard, resume, LoRA."""

from __future__ import annotations

import math
import time

import pytest
import torch

from rlhf import ppo
from rlhf.encoding import pad
from rlhf.models import load_causal_lm, load_tokenizer, position_ids
from rlhf.sampling import SamplingConfig, response_logprobs
from rlhf.scoring import RewardSourceConfig, load_reward_source
from rlhf.tracking import Tracker, read_metrics


def make_config(policy, prompts, out, **stop) -> ppo.PPOConfig:
    return ppo.PPOConfig(
        policy=str(policy),
        output_dir=str(out),
        prompts=ppo.PromptData(train=[str(prompts)]),
        reward=RewardSourceConfig(kind="function", path="conftest:polite_reward"),
        generation=SamplingConfig(temperature=1.0, max_new_tokens=8),
        algo=ppo.PPOAlgoConfig(batch_size=16, minibatch_size=8, micro_batch_size=4, epochs=2),
        optim=ppo.PPOOptimConfig(lr=1e-3, schedule="constant"),
        stop=ppo.StopConfig(**{"max_steps": 4, **stop}),
        precision="fp32",
        save_every=2,
    )


def test_left_padding_does_not_change_logprobs(tiny_model_dir):
    tokenizer = load_tokenizer(str(tiny_model_dir))
    model = load_causal_lm(str(tiny_model_dir), tokenizer).eval()
    short, long = tokenizer("User: hi\nAssistant:")["input_ids"], tokenizer("User: How do I get help with my refund?\nAssistant:")["input_ids"]
    response = torch.tensor([[5, 17, 23, 9]])
    mask = torch.ones(1, 4, dtype=torch.long)
    alone = response_logprobs(model, *pad([short], tokenizer.pad_token_id, "left"), response, mask, 0.7)
    query, query_mask = pad([short, long], tokenizer.pad_token_id, "left")  # `short` gets left padding
    batched = response_logprobs(model, query, query_mask, response.repeat(2, 1), mask.repeat(2, 1), 0.7)
    assert query_mask[0].sum() < query_mask.shape[1]
    torch.testing.assert_close(batched[0], alone[0], atol=1e-5, rtol=0)


def test_rollout_logprobs_and_values_belong_to_the_right_positions(tiny_model_dir, tiny_prompts, tmp_path):
    config = make_config(tiny_model_dir, tiny_prompts, tmp_path)
    tokenizer = load_tokenizer(str(tiny_model_dir))
    model, reference = ppo.build_models(config, tokenizer, torch.device("cpu"))
    model.eval()
    prompts = [tokenizer("User: hi\nAssistant:")["input_ids"], tokenizer("User: How do I get help with my refund?\nAssistant:")["input_ids"]]
    torch.manual_seed(0)
    source = load_reward_source(config.reward)
    batch, _ = ppo.rollout(model, reference, prompts, ["a", "b"], source, config, tokenizer, torch.device("cpu"), False)
    for row, prompt in enumerate(prompts):
        # state before response token 0 is the prompt alone: its last position's outputs
        ids = torch.tensor([prompt])
        logits, values = model(ids, torch.ones_like(ids), position_ids(torch.ones_like(ids)))
        first = batch.responses[row, 0]
        expected = torch.log_softmax(logits[0, -1] / config.generation.temperature, -1)[first]
        assert batch.logprobs[row, 0].item() == pytest.approx(expected.item(), abs=1e-5)
        assert batch.values[row, 0].item() == pytest.approx(values[0, -1].item(), abs=1e-5)
        # state before the last masked token t: prompt + responses[:t]
        t = int(batch.mask[row].sum()) - 1
        ids = torch.tensor([prompt + batch.responses[row, :t].tolist()])
        logits, values = model(ids, torch.ones_like(ids), position_ids(torch.ones_like(ids)))
        expected = torch.log_softmax(logits[0, -1] / config.generation.temperature, -1)[batch.responses[row, t]]
        assert batch.logprobs[row, t].item() == pytest.approx(expected.item(), abs=1e-5)
        assert batch.values[row, t].item() == pytest.approx(values[0, -1].item(), abs=1e-5)
    # policy and reference start equal: the KL is zero and the first ratio is exactly 1
    torch.testing.assert_close(batch.logprobs * batch.mask, batch.ref_logprobs * batch.mask, atol=1e-6, rtol=0)


def test_same_seed_gives_the_same_run(tiny_model_dir, tiny_prompts, tmp_path):
    ppo.train(make_config(tiny_model_dir, tiny_prompts, tmp_path / "a", max_steps=2))
    ppo.train(make_config(tiny_model_dir, tiny_prompts, tmp_path / "b", max_steps=2))
    a, b = read_metrics(tmp_path / "a"), read_metrics(tmp_path / "b")
    for x, y in zip(a, b):
        for key in x:
            if not key.startswith(("time", "memory")):
                assert x[key] == y[key], key
    assert (tmp_path / "a" / "samples.jsonl").read_text() == (tmp_path / "b" / "samples.jsonl").read_text()


def test_ppo_raises_an_easy_reward(tiny_sft_dir, tiny_prompts, tmp_path):
    # The policy closes its replies politely about half the time; the reward pays for politeness.
    # `first` is the untrained policy's score: the first step's samples come before any update
    # (by the second step the policy may already have learned much of it).
    started = time.time()
    config = make_config(tiny_sft_dir, tiny_prompts, tmp_path, max_steps=15)
    config.generation.max_new_tokens = 16
    ppo.train(config)
    scores = [m["score/mean"] for m in read_metrics(tmp_path)]
    first, last = scores[0], sum(scores[-3:]) / 3
    print(f"score {first:.3f} -> {last:.3f} in {time.time() - started:.1f}s")
    assert first < 0.4 and last > first + 0.5


def gameable(config: ppo.PPOConfig) -> ppo.PPOConfig:
    """One point per word and no missing-EOS penalty: rambling on pays without limit."""
    config.reward.path, config.algo.missing_eos_penalty = "conftest:word_count_reward", 0.0
    config.generation.max_new_tokens, config.kl.beta = 24, 0.0
    return config


def test_without_kl_penalty_a_gameable_reward_drives_kl_up_and_the_budget_stops_it(tiny_sft_dir, tiny_prompts, tmp_path):
    ppo.train(gameable(make_config(tiny_sft_dir, tiny_prompts, tmp_path / "free", max_steps=12)))
    kls = [m["kl/sequence"] for m in read_metrics(tmp_path / "free")]
    print("KL per step with beta = 0:", [round(k, 1) for k in kls])
    thirds = [sum(kls[i : i + 4]) / 4 for i in (0, 4, 8)]
    assert thirds[0] < thirds[1] < thirds[2] and kls[-1] > 20  # still climbing, far past any budget
    assert (tmp_path / "free" / "stop_reason.txt").read_text().startswith("max steps")

    ppo.train(gameable(make_config(tiny_sft_dir, tiny_prompts, tmp_path / "guarded", max_steps=12, kl_budget=5.0)))
    metrics = read_metrics(tmp_path / "guarded")
    reason = (tmp_path / "guarded" / "stop_reason.txt").read_text()
    assert reason.startswith("KL budget exceeded") and len(metrics) < 12
    assert metrics[-1]["kl/sequence"] > 5.0 and all(m["kl/sequence"] <= 5.0 for m in metrics[:-1])


class Crash(Exception):
    pass


def test_resume_gives_the_same_metrics_as_an_uninterrupted_run(tiny_model_dir, tiny_prompts, tmp_path, monkeypatch):
    ppo.train(make_config(tiny_model_dir, tiny_prompts, tmp_path / "full", max_steps=5))
    config = make_config(tiny_model_dir, tiny_prompts, tmp_path / "part", max_steps=5)
    original = Tracker.log

    def crash_at_step_4(self, step, metrics):
        if step == 4:
            raise Crash
        original(self, step, metrics)

    with monkeypatch.context() as patch:
        patch.setattr(Tracker, "log", crash_at_step_4)
        with pytest.raises(Crash):
            ppo.train(config)
    config.resume = True
    ppo.train(config)
    a, b = read_metrics(tmp_path / "full"), read_metrics(tmp_path / "part")
    assert [m["step"] for m in b] == [1, 2, 3, 4, 5]
    for x, y in zip(a, b):
        for key in x:
            if not key.startswith(("time", "memory")):
                assert y[key] == pytest.approx(x[key], rel=1e-5, abs=1e-6), (x["step"], key)


def test_lora_reference_is_the_base_with_adapters_off(tiny_model_dir, tiny_prompts, tmp_path):
    config = make_config(tiny_model_dir, tiny_prompts, tmp_path, max_steps=3)
    config.lora.enabled, config.lora.r = True, 4
    tokenizer = load_tokenizer(str(tiny_model_dir))
    model, reference = ppo.build_models(config, tokenizer, torch.device("cpu"))
    assert reference is None
    assert sum(p.numel() for p in model.policy.parameters() if p.requires_grad) < 0.2 * sum(p.numel() for p in model.policy.parameters())
    path = ppo.train(config)
    from transformers import AutoModelForCausalLM

    trained = AutoModelForCausalLM.from_pretrained(path)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    assert (trained.transformer.h[0].attn.c_attn.weight - base.transformer.h[0].attn.c_attn.weight).abs().max() > 1e-6


def test_value_head_on_the_policy_runs(tiny_model_dir, tiny_prompts, tmp_path):
    config = make_config(tiny_model_dir, tiny_prompts, tmp_path, max_steps=2)
    config.value.head_on_policy = True
    ppo.train(config)
    metrics = read_metrics(tmp_path)
    assert len(metrics) == 2 and all(math.isfinite(m["loss/value"]) for m in metrics)
