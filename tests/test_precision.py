"""bf16 autocast: the PPO loss on a fixed batch matches fp32 within a stated tolerance.

bf16 keeps 8 bits of mantissa (relative rounding 2^-8 = 0.4%). Weights, log-probs, ratios and
the losses stay fp32; only the matrix products of the forward pass run in bf16. Stated
tolerance: the combined loss and its terms within 2% (relative) of fp32 or 0.02 absolute, and
the log-probs within 0.05 nats.
"""

from __future__ import annotations

import pytest
import torch

from rlhf import ops, ppo, rl
from rlhf.models import response_slice
from rlhf.rollout import Rollout
from rlhf.encoding import pad
from rlhf.models import load_tokenizer
from rlhf.scoring import RewardSourceConfig


def fixed_batch(model, tokenizer, config) -> Rollout:
    prompts = [tokenizer(f"User: How do I get help with my order {i}?\nAssistant:")["input_ids"] for i in range(6)]
    query, query_mask = pad(prompts, tokenizer.pad_token_id, side="left")
    generator = torch.Generator().manual_seed(3)
    responses = torch.randint(5, 300, (6, 10), generator=generator)
    mask = torch.ones(6, 10, dtype=torch.long)
    mask[::2, 7:] = 0
    scores = torch.randn(6, generator=generator)
    batch = Rollout(query, query_mask, responses, mask, torch.ones(6, dtype=torch.bool), None, None, None, scores, scores)
    with torch.no_grad():
        logits, values = model(*batch.inputs())
    P = query.shape[1]
    batch.logprobs = ops.logprobs_from_logits(response_slice(logits, P), responses) + 0.05 * torch.randn(6, 10, generator=generator)
    batch.ref_logprobs = batch.logprobs - 0.1
    batch.values = response_slice(values, P)
    from accelerate import Accelerator

    ppo.PPO(config).advantages(batch, 0.05, None)
    return batch


def test_ppo_loss_in_bf16_matches_fp32(tiny_sft_dir):
    config = ppo.PPOConfig(policy=str(tiny_sft_dir), reward=RewardSourceConfig(kind="function", path="unused:unused"))
    config.generation.temperature = 1.0
    tokenizer = load_tokenizer(str(tiny_sft_dir))
    torch.manual_seed(0)
    model, _ = rl.build_models(config, ppo.PPO(config), tokenizer, torch.device("cpu"))
    model.eval()
    batch = fixed_batch(model, tokenizer, config)
    rows, n = torch.arange(6), batch.mask.sum()
    loss32, stats32 = rl.minibatch_loss(model, ppo.PPO(config), batch, rows, config, n, 0.05, False)
    loss16, stats16 = rl.minibatch_loss(model, ppo.PPO(config), batch, rows, config, n, 0.05, True)
    print({k: (round(stats32[k].item(), 5), round(stats16[k].item(), 5)) for k in stats32}, loss32.item(), loss16.item())
    assert loss16.dtype == torch.float32
    assert loss16.item() == pytest.approx(loss32.item(), rel=0.02, abs=0.02)
    for key in ("loss/policy", "loss/value", "policy/entropy"):
        assert stats16[key].item() == pytest.approx(stats32[key].item(), rel=0.02, abs=0.02), key
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        logits16, _ = model(*batch.inputs())
    logits32, _ = model(*batch.inputs())
    P = batch.query.shape[1]
    lp16 = ops.logprobs_from_logits(response_slice(logits16, P), batch.responses)
    lp32 = ops.logprobs_from_logits(response_slice(logits32, P), batch.responses)
    # bf16 keeps 8 significant bits: a logit x is off by up to |x| * 2**-8 after one rounding. The
    # bound is two such roundings of the largest logit (CPUs without bf16 instructions round in
    # other places than those with them; 0.05 held on one and not the other).
    bound = 2 * 2**-8 * response_slice(logits32, P).abs().max().item()
    assert (lp16 - lp32).abs().max().item() < bound


def test_auto_precision_takes_bf16_where_measured_matrix_products_pay_and_says_why(monkeypatch, caplog):
    from rlhf import training

    cpu = torch.device("cpu")
    for rates, expected in (({"fp32": 180.0, "bf16": 355.0}, True), ({"fp32": 180.0, "bf16": 3.0}, False), ({"fp32": 180.0, "bf16": 200.0}, False)):
        monkeypatch.setattr(training, "cpu_matmul_rates", lambda rates=rates: rates)
        training._log_once.cache_clear()
        with caplog.at_level("INFO", logger="rlhf.training"):
            assert training.use_bf16("auto", cpu) is expected
        assert f"precision auto: {'bf16' if expected else 'fp32'}; bf16 matrix products measured at {rates['bf16']:.0f} GFLOP/s" in caplog.text
        assert training.use_bf16("fp32", cpu) is False and training.use_bf16("bf16", cpu) is True  # what is asked for is taken


def test_the_matrix_product_measurement_is_of_this_cpu():
    from rlhf import training

    rates = training.cpu_matmul_rates.__wrapped__(n=128, repeats=2)
    assert set(rates) == {"fp32", "bf16"} and all(0 < r < 1e5 for r in rates.values())
