"""Memory modes: gradient checkpointing recomputes activations and changes no number."""

from __future__ import annotations

import pytest
import torch
from accelerate import Accelerator

from rlhf import ops, ppo, reward, sft
from rlhf.encoding import pad
from rlhf.models import load_tokenizer
from rlhf.scoring import RewardSourceConfig
from rlhf.tracking import read_metrics
from rlhf.training import OptimConfig


def checkpointed(model) -> bool:
    return any(getattr(m, "gradient_checkpointing", False) is True for m in model.modules())


def ppo_gradients(tiny_model_dir, checkpointing: bool, lora: bool) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    config = ppo.PPOConfig(policy=str(tiny_model_dir), reward=RewardSourceConfig(kind="function", path="unused:unused"))
    config.gradient_checkpointing, config.lora.enabled = checkpointing, lora
    tokenizer = load_tokenizer(str(tiny_model_dir))
    torch.manual_seed(0)
    model, _ = ppo.build_models(config, tokenizer, torch.device("cpu"))
    assert checkpointed(model) == checkpointing
    prompts = [tokenizer(f"User: How do I get help with my order {i}?\nAssistant:")["input_ids"] for i in range(4)]
    query, query_mask = pad(prompts, tokenizer.pad_token_id, side="left")
    generator = torch.Generator().manual_seed(3)
    responses = torch.randint(5, 300, (4, 8), generator=generator)
    batch = ppo.Rollout(query, query_mask, responses, torch.ones(4, 8, dtype=torch.long), torch.ones(4, dtype=torch.bool))
    batch.scores = batch.raw_scores = torch.randn(4, generator=generator)
    with torch.no_grad():
        logits, values = model(*batch.inputs())
    P = query.shape[1]
    batch.logprobs = ops.logprobs_from_logits(ppo.response_slice(logits, P), responses) + 0.05 * torch.randn(4, 8, generator=generator)
    batch.ref_logprobs, batch.values = batch.logprobs - 0.1, ppo.response_slice(values, P)
    ppo.compute_advantages(batch, 0.05, config, Accelerator(cpu=True))
    model.train()
    loss, _ = ppo.ppo_loss(model, batch, torch.arange(4), config, batch.mask.sum(), bf16=False)
    loss.backward()
    return loss.detach(), {name: p.grad for name, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("lora", [False, True])
def test_ppo_gradients_are_the_same_with_gradient_checkpointing(tiny_model_dir, lora):
    loss, grads = ppo_gradients(tiny_model_dir, False, lora)
    loss_checkpointed, grads_checkpointed = ppo_gradients(tiny_model_dir, True, lora)
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
