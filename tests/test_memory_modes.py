"""Memory modes: what each one saves, and that it changes no number it should not.

Gradient checkpointing keeps fewer activations for the backward pass and gives the same
gradients; with LoRA the reference is the policy's own weights with the adapters off; a value
head on the policy replaces the separate value network by one linear layer on the policy trunk.
"""

from __future__ import annotations

import pytest
import torch
from accelerate import Accelerator

from rlhf import ops, ppo, reward, rl, sft
from rlhf.models import lm_logits, response_slice
from rlhf.rollout import Rollout, reference_forward
from rlhf.encoding import pad
from rlhf.models import load_causal_lm, load_tokenizer
from rlhf.scoring import RewardSourceConfig
from rlhf.tracking import read_metrics
from rlhf.training import OptimConfig


def checkpointed(model) -> bool:
    return any(getattr(m, "gradient_checkpointing", False) is True for m in model.modules())


def parameter_bytes(*modules) -> int:
    """Bytes of the distinct parameter tensors of the modules together, shared ones counted once."""
    tensors = {p.data_ptr(): p.numel() * p.element_size() for m in modules if m is not None for p in m.parameters()}
    return sum(tensors.values())


def ppo_config(tiny_model_dir, checkpointing: bool = False, lora: bool = False, head_on_policy: bool = False) -> ppo.PPOConfig:
    config = ppo.PPOConfig(policy=str(tiny_model_dir), reward=RewardSourceConfig(kind="function", path="unused:unused"))
    config.gradient_checkpointing, config.lora.enabled, config.value.head_on_policy = checkpointing, lora, head_on_policy
    return config


def tiny_rollout(tokenizer, generator: torch.Generator) -> Rollout:
    """Four prompts with random 8-token responses, no EOS."""
    prompts = [tokenizer(f"User: How do I get help with my order {i}?\nAssistant:")["input_ids"] for i in range(4)]
    query, query_mask = pad(prompts, tokenizer.pad_token_id, side="left")
    responses = torch.randint(5, 300, (4, 8), generator=generator)
    return Rollout(query, query_mask, responses, torch.ones(4, 8, dtype=torch.long), torch.ones(4, dtype=torch.bool))


def ppo_gradients(tiny_model_dir, checkpointing: bool, lora: bool) -> tuple[torch.Tensor, dict[str, torch.Tensor], int]:
    """(PPO loss, gradients, bytes of the activations autograd keeps for the backward pass)."""
    config = ppo_config(tiny_model_dir, checkpointing, lora)
    tokenizer = load_tokenizer(str(tiny_model_dir))
    torch.manual_seed(0)
    model, _ = rl.build_models(config, ppo.PPO(config), tokenizer, torch.device("cpu"))
    assert checkpointed(model) == checkpointing
    generator = torch.Generator().manual_seed(3)
    batch = tiny_rollout(tokenizer, generator)
    batch.scores = batch.raw_scores = torch.randn(4, generator=generator)
    with torch.no_grad():
        logits, values = model(*batch.inputs())
    P = batch.query.shape[1]
    batch.logprobs = ops.logprobs_from_logits(response_slice(logits, P), batch.responses) + 0.05 * torch.randn(4, 8, generator=generator)
    batch.ref_logprobs, batch.values = batch.logprobs - 0.1, response_slice(values, P)
    ppo.PPO(config).advantages(batch, 0.05, None)
    model.train()
    # Inside a checkpointed block, checkpointing's own hook takes the place of this one: what
    # reaches `keep` is what stays in memory until the backward pass.
    kept = []

    def keep(tensor):
        kept.append(tensor.numel() * tensor.element_size())
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(keep, lambda tensor: tensor):
        loss, _ = rl.minibatch_loss(model, ppo.PPO(config), batch, torch.arange(4), config, batch.mask.sum(), 0.05, False)
    loss.backward()
    return loss.detach(), {name: p.grad for name, p in model.named_parameters() if p.requires_grad}, sum(kept)


@pytest.mark.parametrize("lora", [False, True])
def test_gradient_checkpointing_keeps_fewer_activations_and_gives_the_same_gradients(tiny_model_dir, lora):
    loss, grads, kept = ppo_gradients(tiny_model_dir, False, lora)
    loss_checkpointed, grads_checkpointed, kept_checkpointed = ppo_gradients(tiny_model_dir, True, lora)
    assert kept_checkpointed < kept / 2, (kept_checkpointed, kept)
    assert loss_checkpointed.item() == pytest.approx(loss.item(), rel=1e-6)
    assert grads.keys() == grads_checkpointed.keys()
    for name in grads:
        torch.testing.assert_close(grads_checkpointed[name], grads[name], atol=1e-6, rtol=1e-5, msg=name)


def test_sft_and_reward_train_the_same_with_gradient_checkpointing(tiny_model_dir, tiny_data, tmp_path, monkeypatch):
    from rlhf import training

    enabled = []
    original = training.enable_gradient_checkpointing
    monkeypatch.setattr(training, "enable_gradient_checkpointing", lambda model: (enabled.append(model), original(model)))

    def sft_run(out, checkpointing):
        config = sft.SFTConfig(
            model=str(tiny_model_dir), output_dir=str(out), data=sft.DataConfig(train=[str(tiny_data["sft"])]),
            optim=OptimConfig(lr=1e-3, batch_size=8, micro_batch_size=8, max_steps=3), eval_every=1000, log_every=1,
            precision="fp32", gradient_checkpointing=checkpointing,
        )
        sft.train(config)
        return [m["train/loss"] for m in read_metrics(out)]

    def reward_run(out, checkpointing):
        config = reward.RewardConfig(
            model=str(tiny_model_dir), output_dir=str(out), data=reward.DataConfig(train=[str(tiny_data["prefs"])]),
            optim=OptimConfig(lr=2e-3, batch_size=8, micro_batch_size=8, max_steps=3), eval_every=1000, log_every=1,
            precision="fp32", gradient_checkpointing=checkpointing,
        )
        reward.train(config)
        return [m["train/loss"] for m in read_metrics(out) if "train/loss" in m]

    for run in (sft_run, reward_run):
        plain, checkpointed_losses = run(tmp_path / f"{run.__name__}-plain", False), run(tmp_path / f"{run.__name__}-ckpt", True)
        assert len(plain) == 3 and checkpointed_losses == pytest.approx(plain, rel=1e-5)
    assert len(enabled) == 2 and all(checkpointed(model) for model in enabled)


def test_lora_reference_is_the_policy_with_adapters_off_and_no_second_copy(tiny_model_dir):
    tokenizer = load_tokenizer(str(tiny_model_dir))
    base = load_causal_lm(str(tiny_model_dir), tokenizer).eval()
    full_model, full_reference = rl.build_models(ppo_config(tiny_model_dir), ppo.PPO(ppo_config(tiny_model_dir)), tokenizer, torch.device("cpu"))
    config = ppo_config(tiny_model_dir, lora=True)
    model, reference = rl.build_models(config, ppo.PPO(config), tokenizer, torch.device("cpu"))
    assert reference is None
    # Full: policy, value network and a whole second policy as the reference. LoRA: policy and
    # value network plus their adapters (and PEFT's trainable copy of the value head), no reference.
    assert parameter_bytes(full_model, full_reference) == parameter_bytes(full_model) + parameter_bytes(base)
    added = ("lora_", "modules_to_save")
    adapters = sum(p.numel() * p.element_size() for name, p in model.named_parameters() if any(a in name for a in added))
    assert parameter_bytes(model, reference) == parameter_bytes(full_model) + adapters

    # Trained adapters (B != 0) move the policy; the reference must stay the base model.
    generator = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, p in model.policy.named_parameters():
            if "lora_B" in name:
                p.copy_(0.5 * torch.randn(p.shape, generator=generator))
    batch = tiny_rollout(tokenizer, generator)
    model.eval()
    with torch.no_grad():
        reference_forward(model.policy, reference, batch, config.generation.temperature, config.algo.micro_batch_size, torch.device("cpu"), False)
        T, temperature = batch.responses.shape[1], config.generation.temperature
        expected = ops.logprobs_from_logits(lm_logits(base, *batch.inputs(), T), batch.responses, temperature)
        policy = ops.logprobs_from_logits(lm_logits(model.policy, *batch.inputs(), T), batch.responses, temperature)
    torch.testing.assert_close(batch.ref_logprobs, expected, atol=1e-5, rtol=1e-5)
    assert (policy - expected).abs().max() > 1e-2


def test_value_head_on_the_policy_is_one_linear_layer_on_its_trunk(tiny_model_dir):
    tokenizer = load_tokenizer(str(tiny_model_dir))
    policy_bytes = parameter_bytes(load_causal_lm(str(tiny_model_dir), tokenizer))
    batch = tiny_rollout(tokenizer, torch.Generator().manual_seed(7))
    trunk_passes = {}
    for head_on_policy in (False, True):
        model, _ = rl.build_models(ppo_config(tiny_model_dir, head_on_policy=head_on_policy), ppo.PPO(ppo_config(tiny_model_dir, head_on_policy=head_on_policy)), tokenizer, torch.device("cpu"))
        calls = []
        for module in model.modules():
            if type(module).__name__ == "GPT2Model":
                module.register_forward_hook(lambda *args: calls.append(1))
        with torch.no_grad():
            model(*batch.inputs(), batch.responses.shape[1])
        trunk_passes[head_on_policy] = len(calls)
        if head_on_policy:
            hidden = model.policy.config.hidden_size
            assert model.value_model is None and parameter_bytes(model) == policy_bytes + 4 * (hidden + 1)
        else:
            assert parameter_bytes(model) > 1.8 * policy_bytes
    assert trunk_passes == {False: 2, True: 1}
