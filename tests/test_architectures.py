"""Every supported architecture through every stage: SFT, reward model, PPO (its value model from
the reward model) and evaluation, with all weights trained and with LoRA adapters, each stage's
saved model loaded back with plain transformers, and the sampler on its fast path.

Each model is a random 2-layer one over the tiny BPE tokenizer of conftest (EOS <|endoftext|>,
no pad token: load_tokenizer adds one), trained for a step or two.
"""

from __future__ import annotations

import logging

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

from conftest import ARCHITECTURES, tiny_causal_lm
from rlhf import evaluation, ppo, reward, rl, sampling, sft
from rlhf.models import LoraConfig
from rlhf.sampling import SamplingConfig
from rlhf.scoring import RewardSourceConfig

ARCHS = ["gpt2", *ARCHITECTURES]
SHORT = SamplingConfig(max_new_tokens=6)


@pytest.fixture(scope="module")
def base_dirs(tiny_model_dir, tmp_path_factory) -> dict[str, str]:
    """A saved tiny model of each architecture, all over the tokenizer of `tiny_model_dir` (a GPT-2)."""
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    root = tmp_path_factory.mktemp("architectures")
    dirs = {"gpt2": str(tiny_model_dir)}
    for arch in ARCHITECTURES:
        path = root / arch
        ids = dict(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=None)  # some configs default to a pad id past this vocabulary
        tiny_causal_lm(arch, len(tokenizer), **ids).save_pretrained(path)
        tokenizer.save_pretrained(path)
        dirs[arch] = str(path)
    return dirs


def finite_outputs(path, auto_class) -> bool:
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = auto_class.from_pretrained(path).eval()
    with torch.no_grad():
        logits = model(**tokenizer(["User: How do I get help with my refund?\nAssistant:"], return_tensors="pt")).logits
    return bool(torch.isfinite(logits).all())


@pytest.mark.parametrize("mode", ["full", "lora"])
@pytest.mark.parametrize("arch", ARCHS)
def test_every_stage_runs_and_saves_a_model_plain_transformers_loads(arch, mode, base_dirs, tiny_data, tiny_prompts, tmp_path, caplog, monkeypatch):
    lora = LoraConfig(enabled=mode == "lora", r=4, alpha=8)
    optim = sft.OptimConfig(lr=1e-3, batch_size=8, micro_batch_size=8, max_steps=2)
    sft_path = sft.train(sft.SFTConfig(
        model=base_dirs[arch], output_dir=str(tmp_path / "sft"), data=sft.DataConfig(train=[str(tiny_data["sft"])]),
        lora=lora, optim=optim, precision="fp32",
    ))
    rm_path = reward.train(reward.RewardConfig(
        model=str(sft_path), output_dir=str(tmp_path / "rm"), data=reward.DataConfig(train=[str(tiny_data["prefs"])], eval_fraction=0.1),
        lora=lora, optim=optim, precision="fp32", normalize=reward.NormalizeConfig(num_samples=16),
    ))
    monkeypatch.setattr(sampling, "_paths_logged", set())  # said once per model class and process
    with caplog.at_level(logging.INFO, logger="rlhf.sampling"):
        ppo_path = ppo.train(ppo.PPOConfig(
            policy=str(sft_path), output_dir=str(tmp_path / "ppo"), prompts=rl.PromptData(train=[str(tiny_prompts)]),
            reward=RewardSourceConfig(kind="model", path=str(rm_path)), generation=SHORT,
            algo=ppo.PPOAlgoConfig(batch_size=4, minibatch_size=4, micro_batch_size=4, epochs=1),
            stop=rl.StopConfig(max_steps=1), lora=lora, precision="fp32",
        ))
        report = evaluation.evaluate(evaluation.EvalConfig(
            reference=str(sft_path), policies=[str(ppo_path)], prompts=[str(tiny_prompts)], num_prompts=4,
            reward=RewardSourceConfig(kind="model", path=str(rm_path)), generation=SHORT, output_dir=str(tmp_path / "eval"), batch_size=4,
        ))
    assert report.exists()
    for path in (sft_path, rm_path, ppo_path, tmp_path / "ppo" / "value"):
        assert (path / "adapter").is_dir() == lora.enabled, path  # the adapters trained, kept beside the merged weights
    paths = {record.getMessage() for record in caplog.records if record.name == "rlhf.sampling"}
    expected = "sampling with the GPT-2 decoder" if arch == "gpt2" else "sampling with the KV-cache decoder"
    assert paths and all(expected in message for message in paths), paths  # no generate fallback (a warning)
    assert all(record.levelno == logging.INFO for record in caplog.records if record.name == "rlhf.sampling")
    for path, auto_class in ((sft_path, AutoModelForCausalLM), (rm_path, AutoModelForSequenceClassification),
                             (ppo_path, AutoModelForCausalLM), (tmp_path / "ppo" / "value", AutoModelForSequenceClassification)):
        assert finite_outputs(path, auto_class), path


@pytest.mark.parametrize("loader", ["causal_lm", "sequence_classifier"])
def test_gelu_written_out_is_loaded_as_the_fused_kernel_of_the_same_function(tiny_model_dir, tmp_path, loader):
    from transformers.activations import GELUTanh, NewGELUActivation

    from rlhf.models import load_causal_lm, load_sequence_classifier, load_tokenizer, save_model

    tokenizer = load_tokenizer(str(tiny_model_dir))
    model = load_causal_lm(str(tiny_model_dir), tokenizer) if loader == "causal_lm" else load_sequence_classifier(str(tiny_model_dir), tokenizer, 1)
    activations = [type(block.mlp.act) for block in model.transformer.h]
    assert activations == [GELUTanh] * len(model.transformer.h)
    plain_class = AutoModelForCausalLM if loader == "causal_lm" else AutoModelForSequenceClassification
    plain = plain_class.from_pretrained(save_model(model, tokenizer, tmp_path / "saved")).eval()
    assert plain.config.activation_function == "gelu_new" and isinstance(plain.transformer.h[0].mlp.act, NewGELUActivation)
    ids = torch.randint(0, len(tokenizer), (3, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours, theirs = model.eval()(input_ids=ids).logits, plain(input_ids=ids).logits
    assert (ours - theirs).abs().max() < 1e-5 and not torch.equal(ours, theirs)  # the same function, another kernel


@pytest.mark.parametrize("loader", ["causal_lm", "sequence_classifier"])
@pytest.mark.parametrize("arch", ARCHS)
def test_under_bf16_autocast_on_a_cpu_attention_computes_in_fp32(arch, loader, base_dirs, monkeypatch):
    # torch's CPU flash-attention runs slower in bf16 than in fp32 (docs/performance.md): the
    # models the stages load hand sdpa fp32 queries, keys and values under bf16 autocast, and bf16
    # attention outputs back, so the result is bf16 sdpa's to bf16 rounding.
    from rlhf import causal_lm
    from rlhf.models import load_causal_lm, load_sequence_classifier, load_tokenizer

    tokenizer = load_tokenizer(base_dirs[arch])
    model = load_causal_lm(base_dirs[arch], tokenizer) if loader == "causal_lm" else load_sequence_classifier(base_dirs[arch], tokenizer, 1)
    model.eval()
    if model.config._attn_implementation != causal_lm.ATTENTION:
        assert model.config._attn_implementation != "sdpa"  # a model on eager or another attention keeps it
        pytest.skip(f"{arch} does not run on sdpa")
    seen, sdpa = [], torch.nn.functional.scaled_dot_product_attention

    def spy(q, k, v, *args, **kwargs):  # what the kernel computes in: autocast casts the inputs past this point
        seen.append(torch.bfloat16 if torch.is_autocast_enabled("cpu") else q.dtype)
        return sdpa(q, k, v, *args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)
    ids = torch.randint(3, len(tokenizer) - 1, (3, 12), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[0, :4] = 0  # left padding
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        ours = model(input_ids=ids, attention_mask=mask).logits
        assert seen and set(seen) == {torch.float32}, seen
        model.set_attn_implementation("sdpa")
        seen.clear()
        theirs = model(input_ids=ids, attention_mask=mask).logits
        assert set(seen) == {torch.bfloat16}  # plain sdpa under autocast: bf16 kernels
    rows = mask.bool() if loader == "causal_lm" else slice(None)
    scale = theirs.float().abs().max().item()
    assert (ours.float() - theirs.float())[rows].abs().max().item() < 2 * 2**-8 * scale + 1e-3
