"""The vLLM rollout engine and what the trainer does with an engine's log-probs that are not its own:
the mismatch it logs, truncated importance sampling, the weights loaded before every rollout.

vLLM needs a CUDA GPU, so the engine is driven here through a stand-in with vLLM's interface
(`LLM(...)`, `generate` of token prompts with `SamplingParams`, `apply_model`, `sleep`,
`wake_up`, `reset_prefix_cache`; request outputs with `token_ids` and per-token `logprobs`
dicts). The stand-in computes in bf16, as vLLM does on a GPU, so its log-probs differ from the
fp32 trainer's; level-2 sleep zeroes its weights, as vLLM discards them.
"""

from __future__ import annotations

import copy
import math
import sys
from types import SimpleNamespace

import pytest
import torch

from rlhf import ops, ppo, rl, vllm_engine
from rlhf.config import ConfigError
from rlhf.models import LoraConfig, add_lora, load_causal_lm, load_tokenizer
from rlhf.rollout import Rollout, importance_weights
from rlhf.sampling import SamplingConfig, sample_with_logprobs
from rlhf.scoring import RewardSourceConfig
from rlhf.tracking import read_metrics


class StandInModel:
    """What `apply_model` hands a function: a model with vLLM's `load_weights(iterable of (name, tensor))`."""

    def __init__(self, module, events):
        self.module, self.events = module, events

    def load_weights(self, weights):
        own = self.module.state_dict()
        loaded = set()
        for name, tensor in weights:
            own[name].copy_(tensor)  # an unknown name is a KeyError, as in vLLM
            loaded.add(name)
        self.events.append(("load", self.module.transformer.h[0].attn.c_attn.weight.float().clone()))
        return loaded


class StandInLLM:
    instances: list = []

    def __init__(self, model, dtype, gpu_memory_utilization, enable_sleep_mode, max_model_len, seed, logprobs_mode, enable_prefix_caching):
        from transformers import AutoModelForCausalLM

        self.module = AutoModelForCausalLM.from_pretrained(model, dtype=torch.bfloat16).eval()
        self.options = dict(dtype=dtype, enable_sleep_mode=enable_sleep_mode, max_model_len=max_model_len, logprobs_mode=logprobs_mode)
        self.events: list = []
        self.pad, self.eos = self.module.config.eos_token_id, self.module.config.eos_token_id
        StandInLLM.instances.append(self)

    def apply_model(self, func):
        return [func(StandInModel(self.module, self.events))]

    def reset_prefix_cache(self):
        self.events.append(("reset_prefix_cache",))

    def sleep(self, level):
        self.events.append(("sleep", level))
        if level == 2:
            with torch.no_grad():
                for parameter in self.module.parameters():
                    parameter.zero_()

    def wake_up(self, tags):
        self.events.append(("wake_up", *tags))

    def generate(self, requests, params, use_tqdm):
        self.events.append(("generate", len(requests)))
        outputs = []
        for request, p in zip(requests, params):
            config = SamplingConfig(temperature=p["temperature"], top_p=p["top_p"], top_k=max(p["top_k"], 0), max_new_tokens=p["max_tokens"])
            generator = torch.Generator().manual_seed(p["seed"])
            samples = sample_with_logprobs(self.module, [request["prompt_token_ids"]], self.pad, p["stop_token_ids"], config, generator)
            ids = samples.responses[0].tolist()
            end = next((i + 1 for i, t in enumerate(ids) if t in p["stop_token_ids"]), len(ids))
            logprobs = [{t: SimpleNamespace(logprob=float(lp))} for t, lp in zip(ids[:end], samples.logprobs[0, :end])]
            finish = "stop" if ids[end - 1] in p["stop_token_ids"] else "length"
            outputs.append(SimpleNamespace(outputs=[SimpleNamespace(token_ids=ids[:end], logprobs=logprobs, finish_reason=finish)]))
        return outputs


@pytest.fixture
def stand_in_vllm(monkeypatch):
    StandInLLM.instances = []
    monkeypatch.setitem(sys.modules, "vllm", SimpleNamespace(__version__="stand-in", LLM=StandInLLM, SamplingParams=lambda **kw: kw))
    monkeypatch.setattr(rl, "check_vllm", lambda key: None)  # no GPU here
    return StandInLLM


def config_for(policy, prompts, out, engine="vllm", **rollout) -> ppo.PPOConfig:
    return ppo.PPOConfig(
        policy=str(policy), output_dir=str(out), prompts=rl.PromptData(train=[str(prompts)]),
        reward=RewardSourceConfig(kind="function", path="conftest:polite_reward"),
        generation=SamplingConfig(temperature=1.0, max_new_tokens=8),
        rollout=rl.RolloutConfig(engine=engine, **rollout),
        algo=ppo.PPOAlgoConfig(batch_size=8, minibatch_size=8, micro_batch_size=8, epochs=1),
        optim=rl.OptimConfig(lr=1e-3, schedule="constant"), stop=rl.StopConfig(max_steps=3), precision="fp32", save_every=10,
    )


def test_ppo_on_the_vllm_engine_loads_the_updated_weights_before_every_rollout_and_logs_the_mismatch(tiny_model_dir, tiny_prompts, tmp_path, stand_in_vllm, monkeypatch):
    synced = []
    sync = vllm_engine.VLLMEngine.sync
    monkeypatch.setattr(vllm_engine.VLLMEngine, "sync", lambda self, policy: (synced.append(policy.transformer.h[0].attn.c_attn.weight.detach().clone()), sync(self, policy)))
    ppo.train(config_for(tiny_model_dir, tiny_prompts, tmp_path))
    (llm,) = stand_in_vllm.instances
    assert llm.options["logprobs_mode"] == "processed_logprobs" and llm.options["enable_sleep_mode"]
    kinds = [event[0] for event in llm.events]
    step = ["wake_up", "load", "reset_prefix_cache", "wake_up", "generate", "sleep"]
    assert kinds == step[1:3] + step[4:] + step + step  # the first rollout finds the engine awake
    assert [e for e in llm.events if e[0] == "wake_up"] == [("wake_up", "weights"), ("wake_up", "kv_cache")] * 2
    loads = [event[1] for event in llm.events if event[0] == "load"]
    initial = load_causal_lm(str(tiny_model_dir), load_tokenizer(str(tiny_model_dir))).transformer.h[0].attn.c_attn.weight
    # bf16 holds what it was given, to its rounding: the start, then each update's weights.
    assert torch.allclose(loads[0], initial.bfloat16().float())
    for loaded, after_update in zip(loads[1:], synced):
        assert torch.allclose(loaded, after_update.bfloat16().float())
        assert not torch.allclose(loaded, loads[0])
    metrics = read_metrics(tmp_path)
    assert len(metrics) == 3
    for row in metrics:
        assert 0 < row["rollout/mismatch_kl"] < 0.05  # bf16 against fp32: close, not equal
        assert 0 < row["rollout/mismatch_max"] and 0.9 < row["rollout/is_weight_mean"] < 1.1


@pytest.mark.parametrize("lora", [False, True])
def test_without_sleep_the_engine_stays_awake_and_still_loads_each_update(tiny_model_dir, tiny_prompts, tmp_path, stand_in_vllm, lora):
    config = config_for(tiny_model_dir, tiny_prompts, tmp_path, sleep=False)
    config.lora = LoraConfig(enabled=lora, r=4)
    ppo.train(config)  # with LoRA, the merged weights load under the checkpoint's names (an unknown one raises)
    (llm,) = stand_in_vllm.instances
    assert [event[0] for event in llm.events] == ["load", "reset_prefix_cache", "generate"] * 3


def test_the_engine_refuses_where_vllm_is_missing_or_there_is_no_gpu(monkeypatch):
    import importlib.util

    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ConfigError, match=r"ppo.rollout.engine: vllm is not installed \(pip install 'rlhf\[vllm\]'\)"):
        rl.check_vllm("ppo.rollout.engine")
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: object())
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match="ppo.rollout.engine: vllm needs a CUDA GPU"):
        rl.check_vllm("ppo.rollout.engine")


def test_the_engine_is_refused_across_processes(tiny_model_dir, tiny_prompts, tmp_path):
    with pytest.raises(ConfigError, match="ppo.rollout.engine: vllm runs in one process on one GPU, got 2 processes"):
        config = config_for(tiny_model_dir, tiny_prompts, tmp_path)
        config.algo.micro_batch_size = 4
        rl.check_config(config, 2, "ppo")


def test_lora_weights_reach_the_engine_merged_under_the_checkpoints_names(tiny_model_dir):
    tokenizer = load_tokenizer(str(tiny_model_dir))
    policy = add_lora(load_causal_lm(str(tiny_model_dir), tokenizer), LoraConfig(enabled=True, r=4), "CAUSAL_LM")
    torch.manual_seed(1)
    for name, parameter in policy.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(parameter, std=0.2)
    before = {name: tensor.clone() for name, tensor in policy.state_dict().items()}
    weights = vllm_engine.hf_weights(policy)
    merged = copy.deepcopy(policy).merge_and_unload().state_dict()
    assert weights.keys() == merged.keys()
    for name in merged:
        assert torch.allclose(weights[name], merged[name], atol=1e-6), name
    assert not torch.allclose(weights["transformer.h.0.attn.c_attn.weight"], before["base_model.model.transformer.h.0.attn.c_attn.base_layer.weight"])
    after = policy.state_dict()
    assert all(torch.equal(after[name], before[name]) for name in before)  # adapters unmerged again


def test_outputs_become_samples_ending_at_the_first_stop_id():
    def output(ids, logprobs):
        return SimpleNamespace(outputs=[SimpleNamespace(token_ids=ids, logprobs=[{t: SimpleNamespace(logprob=lp)} for t, lp in zip(ids, logprobs)])])

    samples = vllm_engine.samples_from_outputs([output([5, 6, 0], [-1.0, -2.0, -0.5]), output([7, 8, 9, 9], [-0.1, -0.2, -0.3, -0.4])], pad_id=1, stop_ids=[0])
    assert samples.responses.tolist() == [[5, 6, 0, 1], [7, 8, 9, 9]]
    assert samples.ended.tolist() == [True, False]
    assert samples.logprobs.tolist() == [[-1.0, -2.0, -0.5, 0.0], pytest.approx([-0.1, -0.2, -0.3, -0.4])]


def hand_batch(trainer: list[list[float]], engine: list[list[float]], mask: list[list[int]]) -> Rollout:
    mask_t = torch.tensor(mask)
    batch = Rollout(torch.zeros(len(mask), 1, dtype=torch.long), torch.ones(len(mask), 1, dtype=torch.long), torch.zeros_like(mask_t), mask_t, torch.ones(len(mask), dtype=torch.bool))
    batch.logprobs, batch.engine_logprobs = torch.tensor(trainer), torch.tensor(engine)
    return batch


def test_truncated_importance_weights_and_the_mismatch_by_hand():
    trainer, engine, mask = [[-1.0, -0.5, -3.0], [-0.2, -2.0, 0.0]], [[-1.2, -0.5, -0.9], [-0.1, -2.5, 0.0]], [[1, 1, 1], [1, 1, 0]]
    batch = hand_batch(trainer, engine, mask)
    metrics = importance_weights(batch, cap=1.5)
    pairs = [(t, e) for row_t, row_e, row_m in zip(trainer, engine, mask) for t, e, m in zip(row_t, row_e, row_m) if m]
    ratios = [math.exp(t - e) for t, e in pairs]  # pi_trainer / pi_engine on the engine's samples
    assert batch.is_weights[mask_positions := torch.tensor(mask).bool()].tolist() == pytest.approx([min(r, 1.5) for r in ratios])
    assert batch.is_weights[~mask_positions].tolist() == [0.0]
    assert metrics["rollout/mismatch_kl"] == pytest.approx(sum(r - 1 - math.log(r) for r in ratios) / 5)
    assert metrics["rollout/mismatch_max"] == pytest.approx(2.1)
    assert metrics["rollout/is_weight_mean"] == pytest.approx(sum(min(r, 1.5) for r in ratios) / 5)
    assert metrics["rollout/is_truncated_fraction"] == pytest.approx(1 / 5)  # exp(0.5) > 1.5 only


def test_a_cap_of_zero_logs_the_mismatch_and_weights_nothing_and_own_logprobs_log_nothing():
    batch = hand_batch([[-1.0, -2.0]], [[-1.5, -2.0]], [[1, 1]])
    metrics = importance_weights(batch, cap=0.0)
    assert batch.is_weights is None and set(metrics) == {"rollout/mismatch_kl", "rollout/mismatch_max"}
    batch.engine_logprobs = None
    assert importance_weights(batch, cap=2.0) == {}


def test_the_policy_loss_weights_each_tokens_term():
    generator = torch.Generator().manual_seed(0)
    logprobs, old = torch.randn(2, 4, generator=generator), torch.randn(2, 4, generator=generator)
    advantages, weights = torch.randn(2, 4, generator=generator), torch.rand(2, 4, generator=generator) * 2
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]])
    loss, _ = ops.policy_loss(logprobs, old, advantages, mask, 0.2, None, weights)
    by_hand = 0.0
    for i in range(2):
        for j in range(4):
            if mask[i, j]:
                ratio = math.exp(logprobs[i, j] - old[i, j])
                a = advantages[i, j].item()
                by_hand += weights[i, j].item() * max(-a * ratio, -a * min(max(ratio, 0.8), 1.2))
    assert loss.item() == pytest.approx(by_hand / 7, rel=1e-5)
    unweighted, _ = ops.policy_loss(logprobs, old, advantages, mask, 0.2)
    assert ops.policy_loss(logprobs, old, advantages, mask, 0.2, None, torch.ones(2, 4))[0].item() == pytest.approx(unweighted.item())


@pytest.mark.parametrize("stage", ["ppo", "grpo"])
def test_the_algorithms_losses_take_the_importance_weights(stage):
    from rlhf import grpo

    generator = torch.Generator().manual_seed(0)
    shape = (4, 5)
    batch = hand_batch(torch.randn(shape, generator=generator).tolist(), torch.randn(shape, generator=generator).tolist(), [[1] * 5] * 4)
    batch.advantages, batch.values, batch.returns = torch.randn(shape, generator=generator), torch.zeros(shape), torch.zeros(shape)
    batch.ref_logprobs = batch.logprobs.clone()
    logprobs, rows = batch.logprobs + 0.01 * torch.randn(shape, generator=generator), torch.arange(4)
    algorithm = ppo.PPO(ppo.PPOConfig()) if stage == "ppo" else grpo.GroupAlgorithm(grpo.GRPOConfig())
    plain = algorithm.loss(logprobs, torch.zeros(shape), batch, rows, 20, 0.0)[1]["loss/policy"]
    batch.is_weights = torch.full(shape, 2.0)
    weighted = algorithm.loss(logprobs, torch.zeros(shape), batch, rows, 20, 0.0)[1]["loss/policy"]
    assert weighted.item() == pytest.approx(2 * plain.item())
