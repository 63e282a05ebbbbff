"""SFT: prompt tokens masked, EOS trained, a smoke run, plain-transformers loading, resume, LoRA."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from rlhf import sft
from rlhf.data import Demonstration
from rlhf.encoding import IGNORE, encode_demonstration, FALLBACK_CHAT_TEMPLATE
from rlhf.models import load_tokenizer
from rlhf.tracking import Tracker, read_metrics


class FixedLogits(torch.nn.Module):
    def __init__(self, logits):
        super().__init__()
        self.logits = logits

    def forward(self, input_ids, attention_mask):
        return type("Out", (), {"logits": self.logits})()


def test_loss_counts_completion_tokens_only():
    # ids: prompt 0 1, completion 2, EOS 3; labels mask the prompt.
    batch = {
        "input_ids": torch.tensor([[0, 1, 2, 3]]),
        "labels": torch.tensor([[IGNORE, IGNORE, 2, 3]]),
        "attention_mask": torch.ones(1, 4, dtype=torch.long),
    }
    logits = torch.zeros(1, 4, 4)
    logits[0, 0, 3] = 50.0  # position 0 predicts prompt token 1: masked, must not count
    # positions 1 and 2 predict the completion token and EOS under uniform logits: log 4 each
    assert sft.token_loss_sum(FixedLogits(logits), batch).item() == pytest.approx(2 * math.log(4), abs=1e-5)
    logits[0, 2, 0] = 50.0  # position 2 predicts EOS: now wrong by a wide margin, so it counts
    assert sft.token_loss_sum(FixedLogits(logits), batch).item() > 40


def test_encoding_masks_the_prompt_and_appends_eos(tiny_model_dir):
    tokenizer = load_tokenizer(str(tiny_model_dir))
    demo = Demonstration("User: hi\nAssistant:", " Hello there.", "x.jsonl:1")
    input_ids, labels = encode_demonstration(tokenizer, demo, 64)
    prompt = AutoTokenizer.from_pretrained(tiny_model_dir)("User: hi\nAssistant:")["input_ids"]
    completion = AutoTokenizer.from_pretrained(tiny_model_dir)(" Hello there.")["input_ids"]
    eos = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    assert input_ids == prompt + completion + [eos]
    assert labels == [IGNORE] * len(prompt) + completion + [eos]
    assert tokenizer.pad_token_id not in (None, eos)


def test_conversation_trains_every_assistant_turn(tiny_model_dir):
    tokenizer = load_tokenizer(str(tiny_model_dir))
    tokenizer.chat_template = FALLBACK_CHAT_TEMPLATE
    messages = [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "hello"},
        {"role": "user", "content": "bye"},
        {"role": "assistant", "content": "ciao"},
    ]
    input_ids, labels = encode_demonstration(tokenizer, Demonstration("", "", "c.jsonl:1", messages), 64)
    assert tokenizer.decode(input_ids) == "User: hi\nAssistant: hello<|endoftext|>\nUser: bye\nAssistant: ciao<|endoftext|>"
    trained = tokenizer.decode([t for t, l in zip(input_ids, labels) if l != IGNORE])
    assert trained == " hello<|endoftext|> ciao<|endoftext|>"


def _config(tiny_model_dir, tiny_data, out, **optim):
    return sft.SFTConfig(
        model=str(tiny_model_dir),
        output_dir=str(out),
        data=sft.DataConfig(train=[str(tiny_data["sft"])], eval_fraction=0.1),
        optim=sft.OptimConfig(lr=1e-3, batch_size=8, micro_batch_size=4, **optim),
        eval_every=5,
        save_every=4,
        log_every=1,
        precision="fp32",
    )


def test_smoke_run_learns_and_saves_for_plain_transformers(tiny_model_dir, tiny_data, tmp_path):
    path = sft.train(_config(tiny_model_dir, tiny_data, tmp_path / "sft", epochs=2))
    metrics = read_metrics(tmp_path / "sft")
    losses = [m["train/loss"] for m in metrics if "train/loss" in m]
    assert all(math.isfinite(x) for x in losses) and losses[-1] < losses[0]
    evals = [m["eval/loss"] for m in metrics if "eval/loss" in m]
    assert evals[-1] < evals[0]
    assert (tmp_path / "sft" / "tb").is_dir()

    model = AutoModelForCausalLM.from_pretrained(path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    assert tokenizer.pad_token_id != tokenizer.eos_token_id
    assert model.get_input_embeddings().num_embeddings == len(tokenizer) == base.config.vocab_size + 1
    changed = (model.transformer.h[0].mlp.c_fc.weight - base.transformer.h[0].mlp.c_fc.weight).abs().max()
    assert changed > 1e-4
    ids = tokenizer("User: How do I get help with my refund?\nAssistant:", return_tensors="pt")
    assert torch.isfinite(model(**ids).logits).all()


class Crash(Exception):
    pass


def crash_at(monkeypatch, step: int):
    """Make the run die when it logs `step`, as a killed process would (the checkpoint before stays)."""
    original = Tracker.log

    def log(self, at, metrics):
        if at == step:
            raise Crash
        original(self, at, metrics)

    monkeypatch.setattr(Tracker, "log", log)


def test_resume_gives_the_same_metrics_as_an_uninterrupted_run(tiny_model_dir, tiny_data, tmp_path, monkeypatch):
    sft.train(_config(tiny_model_dir, tiny_data, tmp_path / "full", max_steps=10))
    interrupted = _config(tiny_model_dir, tiny_data, tmp_path / "part", max_steps=10)
    with monkeypatch.context() as patch:
        crash_at(patch, 7)  # checkpoints at 4 (and 8): steps 5-6 were logged, then lost
        with pytest.raises(Crash):
            sft.train(interrupted)
    interrupted.resume = True
    sft.train(interrupted)
    a = {m["step"]: m for m in read_metrics(tmp_path / "full")}
    b = {m["step"]: m for m in read_metrics(tmp_path / "part")}
    assert sorted(a) == sorted(b) == list(range(1, 11))
    for step in a:
        for key in ("train/loss", "eval/loss", "train/lr"):
            if key in a[step]:
                assert b[step][key] == pytest.approx(a[step][key], rel=1e-5, abs=1e-6), (step, key)


def test_lora_trains_adapters_and_saves_a_merged_model(tiny_model_dir, tiny_data, tmp_path):
    config = _config(tiny_model_dir, tiny_data, tmp_path / "lora", max_steps=6)
    config.lora.enabled, config.lora.r = True, 4
    path = sft.train(config)
    assert (path / "adapter" / "adapter_config.json").exists()
    model = AutoModelForCausalLM.from_pretrained(path)  # merged: no peft needed to load
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    delta = (model.transformer.h[0].attn.c_attn.weight - base.transformer.h[0].attn.c_attn.weight).abs().max()
    assert delta > 1e-5


def test_the_logged_learning_rate_is_the_one_each_step_used(tiny_model_dir, tiny_data, tmp_path):
    sft.train(_config(tiny_model_dir, tiny_data, tmp_path, max_steps=6, warmup_steps=4, schedule="linear"))
    # Steps 1-4 warm up at 0, 1/4, 2/4, 3/4 of lr; steps 5-6 decay linearly: (6 - 4) / 2, (6 - 5) / 2.
    logged = [m["train/lr"] for m in read_metrics(tmp_path)]
    assert logged == pytest.approx([0.0, 2.5e-4, 5e-4, 7.5e-4, 1e-3, 5e-4], rel=1e-9, abs=1e-12)


def test_conversations_on_a_tokenizer_without_a_template_save_the_plain_one(tiny_model_dir, tmp_path):
    from conftest import TOPICS, conversation_for, write_jsonl

    demos = [{"prompt": conversation_for(t), "completion": [{"role": "assistant", "content": "Happy to help."}]} for t in TOPICS for _ in range(3)]
    config = _config(tiny_model_dir, {"sft": write_jsonl(tmp_path / "chat.jsonl", demos)}, tmp_path / "sft", max_steps=1)
    path = sft.train(config)
    assert AutoTokenizer.from_pretrained(tiny_model_dir).chat_template is None
    assert AutoTokenizer.from_pretrained(path).chat_template == FALLBACK_CHAT_TEMPLATE
