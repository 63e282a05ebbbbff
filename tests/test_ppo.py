"""PPO: alignment of log-probs and values, invariances, learning, the KL guard, resume, LoRA."""

from __future__ import annotations

import json
import logging
import math
import time

import pytest
import torch

from rlhf import ppo, rl
from rlhf.rollout import Rollout, score
from rlhf.encoding import pad
from rlhf.models import load_causal_lm, load_tokenizer, position_ids
from rlhf.sampling import SamplingConfig, response_logprobs
from rlhf.scoring import RewardSourceConfig, load_reward_source
from rlhf.tracking import Tracker, read_metrics
from safetensors.torch import load_file

from conftest import constant_reward_model, turn_end_prompt


def make_config(policy, prompts, out, **stop) -> ppo.PPOConfig:
    return ppo.PPOConfig(
        policy=str(policy),
        output_dir=str(out),
        prompts=rl.PromptData(train=[str(prompts)]),
        reward=RewardSourceConfig(kind="function", path="conftest:polite_reward"),
        generation=SamplingConfig(temperature=1.0, max_new_tokens=8),
        algo=ppo.PPOAlgoConfig(batch_size=16, minibatch_size=8, micro_batch_size=4, epochs=2),
        optim=rl.OptimConfig(lr=1e-3, schedule="constant"),
        stop=rl.StopConfig(**{"max_steps": 4, **stop}),
        precision="fp32",
        save_every=2,
    )


def assert_same_metrics(a: list[dict], b: list[dict], **approx) -> None:
    """Two runs' metrics, step by step, times and memory apart: equal, or within `approx` (pytest.approx's)."""
    assert len(a) == len(b)
    for x, y in zip(a, b):
        for key in x:
            if not key.startswith(("time", "memory")):
                assert y[key] == (pytest.approx(x[key], **approx) if approx else x[key]), (x["step"], key)


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
    model, reference = rl.build_models(config, ppo.PPO(config), tokenizer, torch.device("cpu"))
    model.eval()
    prompts = [tokenizer("User: hi\nAssistant:")["input_ids"], tokenizer("User: How do I get help with my refund?\nAssistant:")["input_ids"]]
    torch.manual_seed(0)
    source = load_reward_source(config.reward)
    batch, _ = rl.rollout(model, reference, prompts, ["a", "b"], source, config, tokenizer, torch.device("cpu"), False)
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
    assert len(a) == 2
    assert_same_metrics(a, b)
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

    guarded = gameable(make_config(tiny_sft_dir, tiny_prompts, tmp_path / "guarded", max_steps=12, kl_budget=5.0))
    guarded.save_every = 1
    ppo.train(guarded)
    metrics = read_metrics(tmp_path / "guarded")
    reason = (tmp_path / "guarded" / "stop_reason.txt").read_text()
    assert reason.startswith("KL budget exceeded") and len(metrics) < 12
    assert metrics[-1]["kl/sequence"] > 5.0 and all(m["kl/sequence"] <= 5.0 for m in metrics[:-1])
    # The guard decides before the update: the over-budget batch trains nothing, and the saved
    # policy is the one of the step before.
    assert "loss/policy" not in metrics[-1] and all("loss/policy" in m for m in metrics[:-1])
    before = tmp_path / "guarded" / "checkpoints" / f"step-{len(metrics) - 1:07d}" / "model" / "model.safetensors"
    final, previous = load_file(tmp_path / "guarded" / "model" / "model.safetensors"), load_file(before)
    assert final.keys() == previous.keys() and all(torch.equal(final[k], previous[k]) for k in final)


def test_a_run_stopped_by_the_kl_budget_stays_stopped_on_resume(tiny_sft_dir, tiny_prompts, tmp_path, caplog):
    config = gameable(make_config(tiny_sft_dir, tiny_prompts, tmp_path, max_steps=12, kl_budget=5.0))
    ppo.train(config)
    assert (tmp_path / "stop_reason.txt").read_text().startswith("KL budget exceeded")
    stays_stopped_until_lifted(config, tmp_path, caplog, "kl_budget")


def stays_stopped_until_lifted(config: ppo.PPOConfig, out, caplog, guard: str) -> None:
    """Resuming a run that `stop.<guard>` stopped changes nothing and says so; with the guard
    lifted the run goes on to its step limit."""
    metrics, reason = (out / "metrics.jsonl").read_text(), (out / "stop_reason.txt").read_text()
    config.resume = True
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="rlhf.rl"):
        ppo.train(config)
    assert "already stopped" in caplog.text and reason.strip() in caplog.text
    assert (out / "metrics.jsonl").read_text() == metrics and (out / "stop_reason.txt").read_text() == reason
    setattr(config.stop, guard, None)
    ppo.train(config)
    assert [m["step"] for m in read_metrics(out)] == list(range(1, config.stop.max_steps + 1))
    assert (out / "stop_reason.txt").read_text().startswith("max steps")


def terse(config: ppo.PPOConfig) -> ppo.PPOConfig:
    """Minus a point per word, no KL penalty and no missing-EOS penalty: saying nothing pays best."""
    config.reward.path, config.algo.missing_eos_penalty, config.kl.beta = "conftest:brevity_reward", 0.0, 0.0
    return config


def test_a_reward_for_brevity_collapses_the_responses_and_the_collapse_guard_stops_it_for_good(tiny_sft_dir, tiny_prompts, tmp_path, caplog):
    config = terse(make_config(tiny_sft_dir, tiny_prompts, tmp_path, max_steps=14, min_distinct=45))
    config.save_every = 1
    with caplog.at_level(logging.WARNING, logger="rlhf.rl"):
        ppo.train(config)
    metrics = read_metrics(tmp_path)
    distinct = [m["diversity/distinct_per_100"] for m in metrics]
    print("distinct responses per 100 prompts:", distinct)
    reason = (tmp_path / "stop_reason.txt").read_text()
    assert reason.startswith(f"collapse guard at step {len(metrics)}, before its update: {distinct[-1]:.1f} distinct") and len(metrics) < 14
    assert distinct[-1] < 45 and all(d >= 45 for d in distinct[:-1])
    assert "score/above_band" not in metrics[0]  # a Python function has no held-out band
    # The guard decides before the update: the collapsed batch trains nothing, and the saved
    # policy is the one of the step before.
    assert "loss/policy" not in metrics[-1] and all("loss/policy" in m for m in metrics[:-1])
    before = tmp_path / "checkpoints" / f"step-{len(metrics) - 1:07d}" / "model" / "model.safetensors"
    final, previous = load_file(tmp_path / "model" / "model.safetensors"), load_file(before)
    assert final.keys() == previous.keys() and all(torch.equal(final[k], previous[k]) for k in final)
    # Each kind of warning is logged once, at the first step that shows it, however many do.
    assert sum(m["diversity/top_share"] > 0.2 for m in metrics) > 1 and caplog.text.count("of responses are one and the same text") == 1
    stays_stopped_until_lifted(config, tmp_path, caplog, "min_distinct")


@pytest.mark.parametrize("band, above", [([-0.5, 0.5], True), ([0.5, 2.0], False)])
def test_a_reward_models_band_flags_steps_whose_mean_score_is_above_it(tiny_model_dir, tiny_prompts, tmp_path, caplog, band, above):
    rm = constant_reward_model(tiny_model_dir, tmp_path / "rm", 1.0, band)
    config = make_config(tiny_model_dir, tiny_prompts, tmp_path / "run", max_steps=1)
    config.reward, config.algo.missing_eos_penalty = RewardSourceConfig(kind="model", path=str(rm)), 0.0
    with caplog.at_level(logging.WARNING, logger="rlhf.rl"):
        ppo.train(config)
    (metrics,) = read_metrics(tmp_path / "run")
    assert metrics["score/mean"] == pytest.approx(1.0) and metrics["score/above_band"] == float(above)
    assert ("mean reward-model score 1.00 is above 0.50, the 95th percentile" in caplog.text) == above


def test_warm_up_counts_optimiser_updates_and_the_logged_rate_is_the_one_used(tiny_model_dir, tiny_prompts, tmp_path):
    config = make_config(tiny_model_dir, tiny_prompts, tmp_path, max_steps=3)
    config.algo.epochs = 1  # 16 rollouts in minibatches of 8: two updates a step, six in all
    config.optim = rl.OptimConfig(lr=1e-3, warmup_steps=4, schedule="linear")
    ppo.train(config)
    # The updates run at 0, 1/4, 2/4, 3/4 of lr (warm-up), then decay linearly over the last
    # two: (6 - 4) / 2 = 1 and (6 - 5) / 2 = 1/2. Each step logs the mean of its two.
    logged = [m["train/lr"] for m in read_metrics(tmp_path)]
    assert logged == pytest.approx([1.25e-4, 6.25e-4, 7.5e-4], rel=1e-9)


def test_the_training_pass_at_the_sampling_temperature_reproduces_the_sampled_logprobs(tiny_model_dir, tiny_prompts, tmp_path):
    # Checklist items 10 and 18: before any update the policy is the one that sampled, so with
    # the sampler's own log-probs as the old ones every ratio is 1, at any temperature.
    from rlhf import training

    config = make_config(tiny_model_dir, tiny_prompts, tmp_path)
    config.generation = SamplingConfig(temperature=0.6, max_new_tokens=12)
    tokenizer = load_tokenizer(str(tiny_model_dir))
    model, reference = rl.build_models(config, ppo.PPO(config), tokenizer, torch.device("cpu"))
    model.eval()
    prompts = [tokenizer(f"User: {w}\nAssistant:")["input_ids"] for w in ("hi", "refund please", "where is my invoice", "help")]
    source = load_reward_source(config.reward)
    batch, _ = rl.rollout(model, reference, prompts, ["p"] * 4, source, config, tokenizer, torch.device("cpu"), False, torch.Generator().manual_seed(0))
    ppo.PPO(config).advantages(batch, 0.05, None)
    _, stats = rl.minibatch_loss(model, ppo.PPO(config), batch, torch.arange(4), config, batch.mask.sum(), 0.05, False)
    assert stats["policy/approx_kl"].item() < 1e-9 and stats["policy/clipfrac"].item() == 0.0


def test_the_missing_eos_penalty_replaces_the_score_of_responses_without_eos(tiny_model_dir, tmp_path):
    config = make_config(tiny_model_dir, tmp_path / "unused.jsonl", tmp_path)
    config.reward.path = "conftest:length_reward"
    tokenizer = load_tokenizer(str(tiny_model_dir))
    words = tokenizer(" refund", add_special_tokens=False)["input_ids"] * 3
    responses = torch.tensor([words + [tokenizer.eos_token_id], words + words[:1]])
    batch = Rollout(responses[:, :1], torch.ones(2, 1, dtype=torch.long), responses, torch.ones_like(responses), torch.tensor([True, False]))
    completions = score(batch, ["p", "p"], load_reward_source(config.reward), tokenizer, config.algo.missing_eos_penalty, config.algo.score_clip)
    assert completions == [" refund refund refund", " refund refund refund refund"]
    assert batch.raw_scores.tolist() == [21.0, 28.0] and batch.scores.tolist() == [21.0, -1.0]
    config.algo.missing_eos_penalty, config.algo.score_clip = 0.0, 25.0  # penalty off; clipping on
    score(batch, ["p", "p"], load_reward_source(config.reward), tokenizer, config.algo.missing_eos_penalty, config.algo.score_clip)
    assert batch.scores.tolist() == [21.0, 25.0]


def test_a_rollout_ends_at_the_chat_templates_end_of_turn(turn_end_model_dir, tmp_path):
    # The policy answers <|im_end|> (after "hello" where the prompt ends in "assistant"), then
    # " world"; its tokenizer's EOS is <|endoftext|>.
    config = make_config(turn_end_model_dir, tmp_path / "unused.jsonl", tmp_path)
    config.reward.path = "conftest:length_reward"
    tokenizer = load_tokenizer(str(turn_end_model_dir))
    model, reference = rl.build_models(config, ppo.PPO(config), tokenizer, torch.device("cpu"))
    model.eval()
    prompts = [tokenizer(text)["input_ids"] for text in (turn_end_prompt("thanks"), turn_end_prompt("hello").rstrip("\n"))]
    batch, info = rl.rollout(model, reference, prompts, ["p"] * 2, load_reward_source(config.reward), config, tokenizer, torch.device("cpu"), False)
    turn_end, hello, pad_id = tokenizer.convert_tokens_to_ids("<|im_end|>"), tokenizer.convert_tokens_to_ids("hello"), tokenizer.pad_token_id
    assert batch.responses.tolist() == [[turn_end, pad_id], [hello, turn_end]]
    assert batch.ended.all() and batch.mask.tolist() == [[1, 0], [1, 1]]
    assert info["completions"] == ["", "hello"]  # the reward source scores the text before the end of turn
    assert batch.scores.tolist() == batch.raw_scores.tolist() == [0.0, 5.0]  # no missing-EOS penalty (-1)


class Crash(Exception):
    pass


@pytest.mark.parametrize("updates", ["several", "one"])  # one update a step folds the rollout's value pass into it
def test_resume_gives_the_same_metrics_as_an_uninterrupted_run(tiny_model_dir, tiny_prompts, tmp_path, monkeypatch, updates):
    configured = make_config if updates == "several" else one_update_config
    ppo.train(configured(tiny_model_dir, tiny_prompts, tmp_path / "full", max_steps=5))
    config = configured(tiny_model_dir, tiny_prompts, tmp_path / "part", max_steps=5)
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
    # step 3's samples were written before the crash and again after the resume from step 2: once
    samples = [json.loads(line) for line in (tmp_path / "part" / "samples.jsonl").read_text().splitlines()]
    assert [s["step"] for s in samples] == [step for step in (1, 2, 3, 4, 5) for _ in range(config.samples_per_step)]
    assert (tmp_path / "part" / "samples.jsonl").read_text() == (tmp_path / "full" / "samples.jsonl").read_text()
    assert_same_metrics(a, b, rel=1e-5, abs=1e-6)


def test_lora_reference_is_the_base_with_adapters_off(tiny_model_dir, tiny_prompts, tmp_path):
    config = make_config(tiny_model_dir, tiny_prompts, tmp_path, max_steps=3)
    config.lora.enabled, config.lora.r = True, 4
    tokenizer = load_tokenizer(str(tiny_model_dir))
    model, reference = rl.build_models(config, ppo.PPO(config), tokenizer, torch.device("cpu"))
    assert reference is None
    assert sum(p.numel() for p in model.policy.parameters() if p.requires_grad) < 0.2 * sum(p.numel() for p in model.policy.parameters())
    path = ppo.train(config)
    from transformers import AutoModelForCausalLM

    trained = AutoModelForCausalLM.from_pretrained(path)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    assert (trained.transformer.h[0].attn.c_attn.weight - base.transformer.h[0].attn.c_attn.weight).abs().max() > 1e-6


@pytest.mark.parametrize("lora", [False, True])
def test_a_separate_reference_is_the_one_the_kl_is_measured_to(tiny_model_dir, tiny_sft_dir, tiny_prompts, tmp_path, lora):
    """`rlhf loop` starts later rounds from the last policy with the SFT model as the reference:
    the KL of the first rollout is then the distance between the two, not 0."""
    kls = {}
    for name, reference in (("itself", ""), ("other", str(tiny_model_dir))):
        config = make_config(tiny_sft_dir, tiny_prompts, tmp_path / name, max_steps=1)
        config.reference, config.lora.enabled, config.lora.r = reference, lora, 4
        tokenizer = load_tokenizer(str(tiny_sft_dir))
        model, ref = rl.build_models(config, ppo.PPO(config), tokenizer, torch.device("cpu"))
        assert (ref is None) == (lora and not reference)
        ppo.train(config)
        kls[name] = read_metrics(tmp_path / name)[0]["kl/sequence"]
    assert abs(kls["itself"]) < 1e-4
    assert kls["other"] > 1.0


def test_value_head_on_the_policy_runs(tiny_model_dir, tiny_prompts, tmp_path):
    config = make_config(tiny_model_dir, tiny_prompts, tmp_path, max_steps=2)
    config.value.head_on_policy = True
    ppo.train(config)
    metrics = read_metrics(tmp_path)
    assert len(metrics) == 2 and all(math.isfinite(m["loss/value"]) for m in metrics)


def test_an_over_long_prompt_is_a_data_error_that_skip_invalid_skips(tiny_model_dir, tiny_prompts, tmp_path, caplog):
    from rlhf.data import DataError

    records = tiny_prompts.read_text().splitlines()
    records.insert(2, json.dumps({"prompt": "User: refund " * 40 + "\nAssistant:"}))  # line 3: over 64 - 8 tokens
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("\n".join(records) + "\n")
    config = make_config(tiny_model_dir, prompts, tmp_path / "run", max_steps=1)
    with pytest.raises(DataError, match=rf"^{prompts}:3: field 'prompt': \d+ tokens; the model allows at most 56"):
        ppo.train(config)
    config.prompts.skip_invalid = True
    with caplog.at_level(logging.WARNING, logger="rlhf.data"):
        ppo.train(config)
    assert "skipped 1 prompts too long for the model" in caplog.text and len(read_metrics(tmp_path / "run")) == 1


def test_a_reward_model_with_the_policys_tokenizer_reads_the_sampled_ids(tiny_model_dir, tmp_path):
    from rlhf.encoding import render_prompt
    from rlhf.models import load_sequence_classifier
    from rlhf.sampling import response_mask

    tokenizer = load_tokenizer(str(tiny_model_dir))
    torch.manual_seed(0)
    rm = load_sequence_classifier(str(tiny_model_dir), tokenizer, num_labels=1)
    torch.nn.init.normal_(rm.score.weight, std=1.0)
    rm.config.reward_bias, rm.config.reward_gain = 0.5, 2.0
    rm.save_pretrained(tmp_path / "rm")
    tokenizer.save_pretrained(tmp_path / "rm")
    source = load_reward_source(RewardSourceConfig(kind="model", path=str(tmp_path / "rm")))
    assert source.reads_ids_of(tokenizer)

    eos, words = tokenizer.eos_token_id, lambda text: tokenizer(text, add_special_tokens=False)["input_ids"]
    texts = ["User: Where is my refund?\nAssistant:", "User: How do I reset my password?\nAssistant:", "User: Hi\nAssistant:"]
    spelled = [t for ch in " refund" for t in words(ch)]  # " refund" a character at a time: not how the text encodes
    assert spelled != words(" refund")
    rows = [words(" Your refund is on its way.") + [eos], words(" Open Settings, then Reset") , spelled + [eos]]  # the second was cut short
    width = max(map(len, rows))
    responses = torch.tensor([r + [tokenizer.pad_token_id] * (width - len(r)) for r in rows])
    prompts = [render_prompt(tokenizer, t) for t in texts]
    query, query_mask = pad(prompts, tokenizer.pad_token_id, side="left")
    batch = Rollout(query, query_mask, responses, response_mask(responses, [eos]), torch.tensor([True, False, True]))
    completions = score(batch, texts, source, tokenizer, 0.0, 0.0)
    assert completions == [" Your refund is on its way.", " Open Settings, then Reset", " refund"]
    from_text = source(texts, completions).tolist()  # decoded and encoded again
    # Where encoding the text gives back the sampled ids, both paths read the same tokens.
    assert batch.raw_scores[:2].tolist() == pytest.approx(from_text[:2], abs=1e-5)
    # Where it does not, the reward model reads the ids that were sampled, then EOS, as it was trained.
    with torch.no_grad():
        logit = source.model(input_ids=torch.tensor([prompts[2] + spelled + [eos]])).logits[0, 0].item()
    assert batch.raw_scores[2].item() == pytest.approx(2.0 * (logit + 0.5), abs=1e-5)
    assert batch.raw_scores[2].item() != pytest.approx(from_text[2], abs=1e-3)

    other = load_tokenizer(str(tiny_model_dir))
    other.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    assert not source.reads_ids_of(other)  # another template: the text path


def one_update_config(policy, prompts, out, **stop) -> ppo.PPOConfig:
    """A step that makes one update over one micro-batch: `rl.folds` holds."""
    config = make_config(policy, prompts, out, **stop)
    config.algo = ppo.PPOAlgoConfig(batch_size=8, minibatch_size=8, micro_batch_size=8, epochs=1)
    config.generation.temperature = 0.7
    return config


def test_one_update_per_step_is_the_only_setting_that_folds_the_rollouts_pass():
    algo = ppo.PPOAlgoConfig(batch_size=8, minibatch_size=8, micro_batch_size=8, epochs=1)
    assert rl.folds(algo, 1, 1)
    assert not rl.folds(ppo.PPOAlgoConfig(batch_size=8, minibatch_size=8, micro_batch_size=8, epochs=2), 1, 1)  # a second epoch
    assert not rl.folds(ppo.PPOAlgoConfig(batch_size=8, minibatch_size=4, micro_batch_size=4, epochs=1), 1, 1)  # two minibatches
    assert not rl.folds(ppo.PPOAlgoConfig(batch_size=8, minibatch_size=8, micro_batch_size=4, epochs=1), 1, 1)  # accumulated
    assert rl.folds(ppo.PPOAlgoConfig(batch_size=8, minibatch_size=8, micro_batch_size=4, epochs=1), 1, 2)  # 4 rows on each of 2
    assert rl.folds(ppo.PPOAlgoConfig(batch_size=2, minibatch_size=8, micro_batch_size=8, epochs=1), 4, 1)  # 2 prompts x 4 responses


@pytest.mark.parametrize("critic, precision", [("separate", "fp32"), ("separate", "bf16"), ("head", "fp32"), ("lora", "fp32"), ("checkpointing", "bf16")])
def test_the_folded_update_takes_the_values_and_logprobs_a_pass_of_their_own_gives(tiny_model_dir, tiny_prompts, tmp_path, critic, precision):
    # One update per step: the update's forward pass, run before the advantages, gives what the
    # rollout's value (and, under bf16, log-prob) pass gives, and the update is the same; the
    # value network runs once a step instead of twice.
    from accelerate import Accelerator

    from rlhf import training

    config = one_update_config(tiny_model_dir, tiny_prompts, tmp_path)
    config.value.head_on_policy = critic == "head"
    config.lora.enabled, config.lora.r = critic == "lora", 4  # with LoRA the reference is the policy, adapters off
    config.gradient_checkpointing = critic == "checkpointing"
    bf16 = precision == "bf16"
    tokenizer = load_tokenizer(str(tiny_model_dir))
    prompts = [tokenizer(f"User: {w}\nAssistant:")["input_ids"] for w in ("hi", "refund please", "where is my invoice", "help", "thanks", "my order", "a", "b")]
    source = load_reward_source(config.reward)
    results = {}
    for fold in (False, True):
        torch.manual_seed(0)
        model, reference = rl.build_models(config, ppo.PPO(config), tokenizer, torch.device("cpu"))
        if model.value_head is not None:  # it starts at zero: values the fold could not get wrong
            torch.nn.init.normal_(model.value_head.weight, std=0.5, generator=torch.Generator().manual_seed(5))
        optimizer, scheduler = training.make_optimizer(model, config.optim, 1)
        calls = []
        counted = model.policy if critic == "head" else model.value_model.transformer
        counted.register_forward_hook(lambda *_: calls.append(1))
        batch, info, first = rl.experience(
            model, ppo.PPO(config), reference, prompts, ["p"] * 8, source, config, tokenizer, torch.device("cpu"), bf16, 0.05, lambda t: t,
            torch.Generator().manual_seed(3), fold=fold,
        )
        assert (first is not None) is fold
        stats = rl.update_epochs(model, ppo.PPO(config), optimizer, scheduler, batch, config, Accelerator(cpu=True), bf16, torch.Generator().manual_seed(4), 0.05, first)
        results[fold] = batch, stats, {name: p.detach().clone() for name, p in model.named_parameters()}, len(calls), info
    (a, stats_a, weights_a, calls_a, info_a), (b, stats_b, weights_b, calls_b, info_b) = results[False], results[True]
    assert torch.equal(a.responses, b.responses)
    for name in ("logprobs", "values", "kl", "advantages", "returns"):
        torch.testing.assert_close(getattr(b, name) * b.mask, getattr(a, name) * a.mask, atol=1e-5, rtol=1e-5, msg=name)
    if bf16:  # the engine's fp32 log-probs against the trainer's bf16 ones, measured either way
        assert info_b["rollout/mismatch_kl"] == pytest.approx(info_a["rollout/mismatch_kl"], rel=1e-3)
        torch.testing.assert_close(b.is_weights, a.is_weights, atol=1e-5, rtol=1e-5)
    for key in ("loss/policy", "loss/value", "train/grad_norm"):
        assert stats_b[key] == pytest.approx(stats_a[key], rel=1e-4, abs=1e-6), key
    # the weights that computed the old log-probs: ratios of 1 (exactly under bf16, where the fold gives them)
    assert stats_b["policy/approx_kl"] == pytest.approx(0.0, abs=1e-9) and stats_b["policy/clipfrac"] == 0.0
    # Adam's first step moves a weight by about lr (1e-3) whatever the gradient's size, so where a
    # gradient is near Adam's eps its rounding (the rows summed in another order) shows: 1% of a step.
    for name, value in weights_a.items():
        torch.testing.assert_close(weights_b[name], value, atol=1e-5, rtol=0, msg=name)
    assert (calls_a, calls_b) == (2, 1)  # the critic's network (its trunk: the policy, for a head) runs once a step, not twice


def test_a_run_that_folds_logs_what_a_run_that_does_not_logs(tiny_model_dir, tiny_prompts, tmp_path, monkeypatch):
    ppo.train(one_update_config(tiny_model_dir, tiny_prompts, tmp_path / "folded", max_steps=3))
    with monkeypatch.context() as patch:
        patch.setattr(rl, "folds", lambda *args: False)
        ppo.train(one_update_config(tiny_model_dir, tiny_prompts, tmp_path / "passes", max_steps=3))
    a, b = read_metrics(tmp_path / "passes"), read_metrics(tmp_path / "folded")
    assert len(a) == 3
    assert_same_metrics(a, b, rel=1e-4, abs=1e-5)
    assert "time/value" in a[0] and "time/value" not in b[0]
