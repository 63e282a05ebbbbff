"""The sampler: the tokens of a plain sampler for the same seed, log-probs of a teacher-forced pass,
on every architecture the project supports, each through the sampler's own loop.

The plain sampler below feeds the whole sequence through the model at every step (no cache,
every row computed to the end) and draws each token in Python from the same uniform numbers:
the first token, in id order, whose cumulative probability exceeds the uniform number.
"""

from __future__ import annotations

from dataclasses import replace

import logging
import warnings

import pytest
import torch
from transformers import GenerationConfig, GPT2Config, GPT2LMHeadModel

from conftest import ARCHITECTURES, tiny_causal_lm
from rlhf import causal_lm, sampling
from rlhf.encoding import pad
from rlhf.models import LoraConfig, add_lora, position_ids, stop_token_ids
from rlhf.sampling import SamplingConfig, response_logprobs, response_mask, sample, sample_with_logprobs

EOS, PAD = 0, 1
STOPS = [EOS, 4]  # two stop tokens, as a chat model's EOS and end of turn
VOCAB = 24  # small, so that stop tokens come up and sequences end at different steps

# The sampler's log-probs come from a cached decoding pass, the training pass's from the whole
# sequence at once: the same arithmetic in another order. Measured differences are below 1e-6
# for these models and the benchmark's; the stated bound leaves room for wider and deeper ones.
LOGPROB_TOLERANCE = 1e-5


def plain_draw(logits: torch.Tensor, uniform: float, config: SamplingConfig) -> int:
    if config.temperature == 0:
        return int(logits.argmax())
    probs = torch.softmax(logits.double() / config.temperature, -1).tolist()
    ranked = sorted(range(len(probs)), key=lambda j: -probs[j])
    allowed = ranked[: config.top_k] if config.top_k else ranked
    if config.top_p < 1:
        nucleus, mass, total = [], 0.0, sum(probs[j] for j in allowed)
        for j in allowed:  # most likely first, until top_p of the mass is in
            if mass >= config.top_p * total:
                break
            nucleus.append(j)
            mass += probs[j]
        allowed = nucleus
    total, cumulative = sum(probs[j] for j in allowed), 0.0
    for j in range(len(probs)):
        if j in allowed:
            cumulative += probs[j]
            if cumulative > uniform * total:
                return j
    return max(allowed)


@torch.no_grad()
def plain_sample(model, prompts: list[list[int]], config: SamplingConfig) -> list[list[int]]:
    sequences, responses = [list(p) for p in prompts], [[] for _ in prompts]
    done = [False] * len(prompts)
    for _ in range(config.max_new_tokens):
        uniform = torch.rand(len(prompts))
        ids, mask = pad(sequences, PAD, side="left")
        logits = model(input_ids=ids, attention_mask=mask, position_ids=position_ids(mask)).logits[:, -1]
        for i in range(len(prompts)):
            if not done[i]:
                token = plain_draw(logits[i], uniform[i].item(), config)
                responses[i].append(token)
                sequences[i].append(token)
                done[i] = token in STOPS
        if all(done):
            break
    width = max(len(r) for r in responses)
    return [r + [PAD] * (width - len(r)) for r in responses]


def first_stop(row: list[int]) -> int | None:
    """The index of the first stop token of a response, None where it has none."""
    return next((i for i, token in enumerate(row) if token in STOPS), None)


def gpt2(vocab: int = VOCAB):
    """GPT-2: the sampler's own decoder of its modules."""
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=vocab, n_positions=64, n_embd=32, n_layer=2, n_head=2, bos_token_id=EOS, eos_token_id=EOS, pad_token_id=PAD)
    return GPT2LMHeadModel(config).eval()


def with_lora(model):
    model = add_lora(model, LoraConfig(enabled=True, r=4), "CAUSAL_LM")
    torch.manual_seed(1)
    for name, parameter in model.named_parameters():
        if "lora_B" in name:  # peft starts B at zero; make the adapters change the outputs
            torch.nn.init.normal_(parameter, std=0.2)
    return model.eval()


def tiny(arch: str):
    """A builder of a random 2-layer model of `arch` (conftest.ARCHITECTURES) with the test's ids."""
    return lambda vocab=VOCAB: tiny_causal_lm(arch, vocab, bos_token_id=2, eos_token_id=EOS, pad_token_id=PAD)


llama = tiny("llama")
MODELS = {
    "gpt2": gpt2,
    "gpt2+lora": lambda vocab=VOCAB: with_lora(gpt2(vocab)),
    "llama": llama,
    "llama+lora": lambda vocab=VOCAB: with_lora(llama(vocab)),
    **{arch: tiny(arch) for arch in ARCHITECTURES if arch != "llama"},
}
SETTINGS = {
    "t1": SamplingConfig(temperature=1.0, max_new_tokens=20),
    "t0.7-topk": SamplingConfig(temperature=0.7, top_k=6, max_new_tokens=20),
    "t1.3-topp": SamplingConfig(temperature=1.3, top_p=0.8, max_new_tokens=20),
    "greedy": SamplingConfig(temperature=0.0, max_new_tokens=20),
}


def prompts(n: int = 12, vocab: int = VOCAB, seed: int = 3) -> list[list[int]]:
    generator = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, 9, (n,), generator=generator).tolist()  # unequal: left padding
    return [torch.randint(2, vocab, (k,), generator=generator).tolist() for k in lengths]


@pytest.mark.parametrize("setting", SETTINGS)
@pytest.mark.parametrize("name", MODELS)
def test_same_seed_same_tokens_as_a_plain_sampler(name, setting):
    model, config, batch = MODELS[name](), SETTINGS[setting], prompts()
    torch.manual_seed(7)
    expected = plain_sample(model, batch, config)
    torch.manual_seed(7)
    samples = sample_with_logprobs(model, batch, PAD, STOPS, config)
    assert samples.responses.tolist() == expected
    assert samples.ended.tolist() == [first_stop(row) is not None for row in expected]
    if setting == "t1":  # sequences ended at different steps, at either stop token, so finished rows left the batch
        lengths = response_mask(samples.responses, STOPS).sum(-1)
        assert samples.ended.any() and len(set(lengths.tolist())) > 2
        assert {row[first_stop(row)] for row in expected if first_stop(row) is not None} == set(STOPS)


@pytest.mark.parametrize("name", MODELS)
def test_prompts_sampled_a_few_at_a_time_get_the_same_tokens(name):
    model, batch, whole = MODELS[name](), prompts(), SamplingConfig(temperature=1.0, max_new_tokens=20)
    at_once, a_few = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    samples = sample_with_logprobs(model, batch, PAD, STOPS, whole, at_once)
    parts = sample_with_logprobs(model, batch, PAD, STOPS, replace(whole, batch_size=5), a_few)
    assert torch.equal(a_few.get_state(), at_once.get_state())  # and the generator is left where the whole batch leaves it
    torch.manual_seed(5)  # torch's default generator, as when no generator is given
    default = sample_with_logprobs(model, batch, PAD, STOPS, replace(whole, batch_size=5))
    after = torch.rand(1)
    torch.manual_seed(5)
    assert sample_with_logprobs(model, batch, PAD, STOPS, whole).responses.tolist() == default.responses.tolist() and torch.equal(torch.rand(1), after)
    assert parts.responses.tolist() == samples.responses.tolist() and parts.ended.tolist() == samples.ended.tolist()
    assert torch.allclose(parts.logprobs, samples.logprobs, atol=LOGPROB_TOLERANCE)
    lengths = response_mask(samples.responses, STOPS).sum(-1)
    assert len(set(lengths[:5].tolist() + lengths[5:10].tolist())) > 1  # the parts ended at different lengths, padded alike


@pytest.mark.parametrize("name", MODELS)
def test_logprobs_match_a_teacher_forced_forward_pass(name):
    model, batch = MODELS[name](vocab=400), prompts(16, vocab=400)
    config = SamplingConfig(temperature=0.7, top_p=0.9, max_new_tokens=24)
    torch.manual_seed(0)
    samples = sample_with_logprobs(model, batch, PAD, STOPS, config)
    query, query_mask = pad(batch, PAD, side="left")
    mask = response_mask(samples.responses, STOPS)
    forced = response_logprobs(model, query, query_mask, samples.responses, mask, config.temperature)
    torch.testing.assert_close(samples.logprobs * mask, forced * mask, atol=LOGPROB_TOLERANCE, rtol=0)
    assert (samples.logprobs[mask == 0] == 0).all()


def test_the_contract_of_sample_holds():
    model = gpt2()
    torch.manual_seed(5)
    responses, ended = sample(model, prompts(), PAD, STOPS, SamplingConfig(temperature=1.0, max_new_tokens=30))
    for row, did_end in zip(responses.tolist(), ended.tolist()):
        assert did_end == (first_stop(row) is not None)
        if did_end:
            assert all(t == PAD for t in row[first_stop(row) + 1 :])  # pad after the first stop token
    if ended.all():  # the loop stops once every response has ended
        assert responses.shape[1] == int(response_mask(responses, STOPS).sum(-1).max())


@pytest.mark.parametrize("name", MODELS)
def test_every_supported_architecture_takes_a_fast_path(name, caplog, monkeypatch):
    # The test that fails on a transformers release that changes how a forward takes a cache or
    # keeps logits: then a model falls back to generate, or passes an argument the release renamed.
    model = MODELS[name]()
    for found in ("_cache_keyword", "_keeps_logits"):  # found once per model class: find them again here
        monkeypatch.setattr(causal_lm, found, {})
    monkeypatch.setattr(sampling, "_paths_logged", set())
    with caplog.at_level(logging.INFO, logger="rlhf.sampling"), warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)  # how transformers says that an argument was renamed
        sample(model, prompts(), PAD, STOPS, SamplingConfig(max_new_tokens=4))
    decoder = "GPT-2 decoder" if name.startswith("gpt2") else f"KV-cache decoder (cache keyword {causal_lm.CACHE_KEYWORDS[0]!r})"
    (message,) = [record.getMessage() for record in caplog.records]
    assert message.startswith(type(causal_lm.base_model(model)).__name__) and message.endswith(f": sampling with the {decoder}")


@pytest.mark.parametrize("name", MODELS)
def test_the_language_model_head_runs_on_the_kept_positions_alone(name, monkeypatch):
    model = MODELS[name]()
    monkeypatch.setattr(causal_lm, "_keeps_logits", {})
    ids, mask = pad(prompts(), PAD, side="left")
    inputs = dict(input_ids=ids, attention_mask=mask, position_ids=position_ids(mask))
    widths = []
    model.get_output_embeddings().register_forward_hook(lambda module, args, out: widths.append(args[0].shape[1]))
    with torch.no_grad():
        full = model(**inputs).logits
        kept = causal_lm.last_logits(model, inputs, 3).logits
    assert widths == [ids.shape[1], 3]
    torch.testing.assert_close(kept, full[:, -3:])


class NoCacheForward(GPT2LMHeadModel):
    """A causal LM whose forward ignores any cache it is given: the sampler cannot drive it."""

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, **kwargs):
        return super().forward(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False)


def no_cache_gpt2(vocab: int = VOCAB, **generation_settings):
    """GPT-2 behind NoCacheForward, with `generation_settings` in the checkpoint's generation_config."""
    model = NoCacheForward(gpt2(vocab).config).eval()
    model.generation_config = GenerationConfig(**generation_settings)
    return model


def test_a_model_the_sampler_cannot_drive_falls_back_to_generate(caplog, monkeypatch):
    model, batch = no_cache_gpt2(), prompts(16)
    monkeypatch.setattr(sampling, "_paths_logged", set())
    config = SamplingConfig(temperature=0.7, top_p=0.9, max_new_tokens=24)
    torch.manual_seed(0)
    with caplog.at_level(logging.INFO, logger="rlhf.sampling"):
        samples = sample_with_logprobs(model, batch, PAD, STOPS, config)
    assert "NoCacheForward: falling back to transformers' generate" in caplog.text
    for row, did_end in zip(samples.responses.tolist(), samples.ended.tolist()):
        assert did_end == (first_stop(row) is not None)
        if did_end:
            assert all(t == PAD for t in row[first_stop(row) + 1 :])
    query, query_mask = pad(batch, PAD, side="left")
    mask = response_mask(samples.responses, STOPS)
    forced = response_logprobs(model, query, query_mask, samples.responses, mask, config.temperature)
    torch.testing.assert_close(samples.logprobs * mask, forced * mask, atol=LOGPROB_TOLERANCE, rtol=0)
    assert (mask == 0).any() and (samples.logprobs[mask == 0] == 0).all()  # some responses ended early


def test_the_fallback_restricts_sampling_by_top_k():
    # top_k = 1 leaves the most likely token alone: the fallback's samples are the greedy ones.
    model, batch = no_cache_gpt2(), prompts(16)
    torch.manual_seed(0)
    top1 = sample(model, batch, PAD, STOPS, SamplingConfig(temperature=1.0, top_k=1, max_new_tokens=12))[0]
    greedy = sample(model, batch, PAD, STOPS, SamplingConfig(temperature=0.0, max_new_tokens=12))[0]
    assert torch.equal(top1, greedy)


class FailingForward(GPT2LMHeadModel):
    """A causal LM whose forward fails with a TypeError of its own (a bug) whenever it is given a cache."""

    def forward(self, *args, **kwargs):
        if any(kwargs.get(name) is not None for name in ("cache", "past_key_values")):
            raise TypeError("unsupported operand type(s) for +: 'Tensor' and 'NoneType'")
        return super().forward(*args, **kwargs)


def test_a_type_error_inside_the_forward_is_raised_not_taken_for_a_missing_keyword():
    # Taken for "this keyword is unknown", it would send every rollout to the slow fallback.
    with pytest.raises(TypeError, match="unsupported operand"):
        sample(FailingForward(gpt2().config).eval(), prompts(), PAD, STOPS, SamplingConfig(max_new_tokens=4))


def generate_with_own_config(model, batch: list[list[int]], config: SamplingConfig) -> list[list[int]]:
    """What `model.generate` samples with the checkpoint's generation_config under the test's settings."""
    ids, mask = pad(batch, PAD, side="left")
    sampled = config.temperature > 0
    out = model.generate(
        input_ids=ids, attention_mask=mask, max_new_tokens=config.max_new_tokens, pad_token_id=PAD, eos_token_id=EOS, use_cache=False,
        do_sample=sampled, **(dict(temperature=config.temperature, top_k=0, top_p=1.0) if sampled else {}),
    )
    return sampling.truncate_at_eos(out[:, ids.shape[1] :], [EOS], PAD)[0].tolist()


def test_the_checkpoints_generation_config_does_not_reach_greedy_rollouts():
    settings = dict(repetition_penalty=10.0, no_repeat_ngram_size=2, min_new_tokens=5)
    model, batch, greedy = no_cache_gpt2(**settings), prompts(), SETTINGS["greedy"]
    expected = plain_sample(model, batch, greedy)
    assert sample(model, batch, PAD, STOPS, greedy)[0].tolist() == expected
    assert generate_with_own_config(model, batch, greedy) != expected  # the settings do change generate's tokens


# Settings a checkpoint's generation_config may carry that generate would apply to rollouts when
# the config it is given leaves them unset; several are off only while unset (None).
CHECKPOINT_SETTINGS = {
    "repetition_penalty": 10.0,
    "no_repeat_ngram_size": 2,
    "min_new_tokens": 5,
    "bad_words_ids": [[5]],
    "suppress_tokens": [5, 7],
    "begin_suppress_tokens": [5, 7, 9],
    "sequence_bias": [[[5], -100.0]],
    "forced_eos_token_id": EOS,
    "exponential_decay_length_penalty": (2, 2.0),
    "typical_p": 0.5,
    "epsilon_cutoff": 0.1,
    "num_beams": 2,
    "max_time": 0.0,
}


@pytest.mark.parametrize("setting", CHECKPOINT_SETTINGS)
def test_no_setting_of_the_checkpoints_generation_config_reaches_sampled_rollouts(setting):
    config, batch = SETTINGS["t1"], prompts()
    clean, model = no_cache_gpt2(), no_cache_gpt2(**{setting: CHECKPOINT_SETTINGS[setting]})
    torch.manual_seed(0)
    expected = sample(clean, batch, PAD, [EOS], config)[0].tolist()
    torch.manual_seed(0)
    assert sample(model, batch, PAD, [EOS], config)[0].tolist() == expected
    torch.manual_seed(0)
    assert generate_with_own_config(model, batch, config) != expected  # the setting does change generate's tokens


@pytest.mark.parametrize("name", ["gpt2", "llama", "no-cache"])
def test_a_generator_gives_the_tokens_and_leaves_the_default_one_alone(name):
    model = no_cache_gpt2() if name == "no-cache" else MODELS[name]()
    config, batch = SETTINGS["t1"], prompts()
    state = torch.get_rng_state()
    first = sample(model, batch, PAD, STOPS, config, torch.Generator().manual_seed(11))[0]
    second = sample(model, batch, PAD, STOPS, config, torch.Generator().manual_seed(11))[0]
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(first, second)
    assert not torch.equal(first, sample(model, batch, PAD, STOPS, config, torch.Generator().manual_seed(12))[0])


def test_a_response_ends_at_its_first_token_of_any_stop_id():
    stops, pad_id = [0, 3], 9
    responses = torch.tensor([[5, 3, 7, 0], [5, 6, 7, 8], [0, 3, 3, 3], [4, 4, 3, 0]])
    truncated, ended = sampling.truncate_at_eos(responses, stops, pad_id)
    assert truncated.tolist() == [[5, 3, 9, 9], [5, 6, 7, 8], [0, 9, 9, 9], [4, 4, 3, 9]]
    assert ended.tolist() == [True, False, True, True]
    # the stop token itself is in the mask (its log-prob is trained and the score sits on it)
    expected = [[1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0], [1, 1, 1, 0]]
    assert response_mask(truncated, stops).tolist() == expected
    assert response_mask(responses, stops).tolist() == expected  # the tokens after the first stop do not matter


def favouring(model, token: int):
    """`model` with `token`'s logit raised by 50 at every position: it is sampled all but surely."""
    bias = torch.zeros(model.config.vocab_size)
    bias[token] = 50.0
    model.get_output_embeddings().register_forward_hook(lambda module, args, logits: logits + bias)
    return model


@pytest.mark.parametrize("name", ["gpt2", "qwen2", "no-cache"])  # the GPT-2 decoder, the KV-cache decoder, generate
def test_the_sampler_stops_at_the_second_stop_token(name):
    second = STOPS[1]
    model = favouring(no_cache_gpt2() if name == "no-cache" else MODELS[name](), second)
    config = SamplingConfig(temperature=1.0, max_new_tokens=6)
    samples = sample_with_logprobs(model, prompts(), PAD, STOPS, config)
    assert samples.responses.tolist() == [[second]] * len(prompts())
    assert samples.ended.all() and response_mask(samples.responses, STOPS).sum(-1).tolist() == [1] * len(prompts())
    responses, ended = sample(model, prompts(), PAD, [EOS], config)  # with EOS alone the same model never stops
    assert responses.shape[1] == config.max_new_tokens and not ended.any()


def test_restrict_keeps_the_top_k_then_the_nucleus():
    probs = torch.tensor([[0.0625, 0.375, 0.125, 0.25, 0.1875]])  # exact in binary
    assert sampling.restrict(probs, 3, 1.0).tolist() == [[0.0, 0.375, 0.0, 0.25, 0.1875]]
    # nucleus 0.6: 0.375, then 0.25 (0.375 before it, under 0.6); 0.1875 has 0.625 before it
    assert sampling.restrict(probs, 0, 0.6).tolist() == [[0.0, 0.375, 0.0, 0.25, 0.0]]
    # after top-3 the mass is 0.8125; the nucleus takes 0.7 of it, 0.56875: again 0.375 and 0.25
    assert sampling.restrict(probs, 3, 0.7).tolist() == [[0.0, 0.375, 0.0, 0.25, 0.0]]
    assert sampling.restrict(probs, 0, 0.01).tolist() == [[0.0, 0.375, 0.0, 0.0, 0.0]]  # the most likely always stays


@pytest.mark.parametrize("bf16", [False, True])
def test_ppo_takes_the_sampled_logprobs_in_fp32_and_recomputes_them_under_bf16(tiny_model_dir, bf16):
    # Checklist item 18: the old log-probs are those of the policy that sampled, recomputed by the
    # training pass under bf16, where the sampler decodes under the same autocast but its products
    # have other shapes than the training pass's.
    from rlhf import ops, ppo, rl, training
    from rlhf.models import load_tokenizer, response_slice
    from rlhf.rollout import LocalEngine, generate, policy_forward
    from rlhf.scoring import RewardSourceConfig

    config = ppo.PPOConfig(policy=str(tiny_model_dir), reward=RewardSourceConfig(kind="function", path="conftest:length_reward"))
    config.generation = SamplingConfig(temperature=0.7, max_new_tokens=8)
    tokenizer = load_tokenizer(str(tiny_model_dir))
    model, _ = rl.build_models(config, ppo.PPO(config), tokenizer, torch.device("cpu"))
    model.eval()
    batch = [tokenizer("User: hi\nAssistant:")["input_ids"], tokenizer("User: How do I get help with my refund?\nAssistant:")["input_ids"]]
    torch.manual_seed(0)
    with training.autocast(torch.device("cpu"), bf16):
        sampled = sample_with_logprobs(model.policy, batch, tokenizer.pad_token_id, stop_token_ids(tokenizer, model.policy), config.generation)
    torch.manual_seed(0)
    stop_ids = stop_token_ids(tokenizer, model.policy)
    engine = LocalEngine(model.policy, tokenizer.pad_token_id, stop_ids, config.generation, bf16)
    rollout = generate(engine, batch, tokenizer.pad_token_id, stop_ids, torch.device("cpu"))
    policy_calls = []
    model.policy.register_forward_hook(lambda *args: policy_calls.append(1))
    policy_forward(model, rollout, config.generation.temperature, config.algo.micro_batch_size, torch.device("cpu"), bf16)
    assert torch.equal(rollout.responses, sampled.responses)
    if not bf16:
        assert torch.equal(rollout.logprobs, sampled.logprobs) and not policy_calls  # no second policy pass
    else:
        ids, attention, positions = rollout.inputs()
        with torch.no_grad(), training.autocast(torch.device("cpu"), True):
            logits = model.policy(input_ids=ids, attention_mask=attention, position_ids=positions).logits
        recomputed = ops.logprobs_from_logits(response_slice(logits, rollout.query.shape[1]), rollout.responses, 0.7)
        assert policy_calls and torch.equal(rollout.logprobs, recomputed)
        # The sampler's are the engine's: the mismatch is measured against them.
        assert torch.equal(rollout.engine_logprobs, sampled.logprobs * rollout.mask)
        from rlhf.rollout import importance_weights

        mismatch = importance_weights(rollout, 2.0)
        assert 0 <= mismatch["rollout/mismatch_kl"] < 1e-4 and rollout.is_weights is not None


def test_under_bf16_autocast_the_gpt2_decoder_attends_in_fp32_as_the_training_pass_does(tiny_model_dir, monkeypatch):
    # Both attend in fp32 on a CPU (causal_lm.fp32_attention_on_cpu: the bf16 flash kernels are
    # slower there) around the same bf16 products, so the sampler's log-probs are the trainer's up
    # to how the products' shapes round (here exactly; attention in bf16 moved them by 2.7e-3).
    from rlhf import ops, training
    from rlhf.models import load_causal_lm, load_tokenizer

    tokenizer = load_tokenizer(str(tiny_model_dir))
    model = load_causal_lm(str(tiny_model_dir), tokenizer).eval()
    prompts = [tokenizer("User: hi\nAssistant:")["input_ids"], tokenizer("User: How do I get a refund?\nAssistant:")["input_ids"]]
    stop_ids = stop_token_ids(tokenizer, model)
    kernels, sdpa = [], torch.nn.functional.scaled_dot_product_attention

    def spy(q, k, v, *args, **kwargs):  # the precision the kernel computes in: autocast casts past this point
        kernels.append(torch.bfloat16 if torch.is_autocast_enabled("cpu") else q.dtype)
        return sdpa(q, k, v, *args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)
    torch.manual_seed(0)
    with training.autocast(torch.device("cpu"), True):
        samples = sample_with_logprobs(model, prompts, tokenizer.pad_token_id, stop_ids, SamplingConfig(temperature=0.7, max_new_tokens=12))
        decoded = len(kernels)
        query, query_mask = pad(prompts, tokenizer.pad_token_id, side="left")
        mask = response_mask(samples.responses, stop_ids)
        ids, attention = torch.cat([query, samples.responses], 1), torch.cat([query_mask, mask], 1)
        with torch.no_grad():
            logits = model(input_ids=ids, attention_mask=attention, position_ids=position_ids(attention)).logits[:, query.shape[1] - 1 : -1]
    teacher_forced = ops.logprobs_from_logits(logits, samples.responses, 0.7) * mask
    assert samples.responses.shape[1] > 4 and decoded > 4 and set(kernels) == {torch.float32}
    assert (samples.logprobs * mask - teacher_forced).abs().max().item() < 1e-2
