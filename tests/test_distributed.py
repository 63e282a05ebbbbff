"""Data parallel: two processes with half the batch each make the update one process makes
with the whole batch; metrics are reduced and only the main process writes."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from rlhf.tracking import read_metrics

HERE = Path(__file__).parent


def launch(args: list[str], processes: int, cwd: Path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(HERE)}
    if processes == 1:
        command = [sys.executable, *args]
    else:
        command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes), "--master_port", str(29500 + os.getpid() % 1000), *args]
    result = subprocess.run(command, capture_output=True, text=True, cwd=cwd, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]


@pytest.mark.parametrize("fold", [False, True])  # True: the update's forward pass gives the values (rl.fold_forward)
def test_ppo_update_over_two_processes_equals_one(tiny_model_dir, tmp_path, fold):
    script, mode = str(HERE / "distributed_update.py"), ["fold"] if fold else []
    launch([script, str(tiny_model_dir), str(tmp_path / "one.pt"), *mode], 1, tmp_path)
    launch([script, str(tiny_model_dir), str(tmp_path / "two.pt"), *mode], 2, tmp_path)
    one, two = torch.load(tmp_path / "one.pt"), torch.load(tmp_path / "two.pt")
    changed = 0
    # Adam's first step moves a weight by lr * g / (|g| + eps), about lr = 1e-2 whatever g's size:
    # where |g| is near eps (1e-8) the rounding of g, summed in another order over two processes,
    # shows in the step (measured up to 2.3e-5). 1e-4 is 1% of a step; a share of the batch
    # missed or counted twice moves weights by whole steps.
    for name, value in one["params"].items():
        torch.testing.assert_close(two["params"][name], value, atol=1e-4, rtol=1e-4, msg=name)
    base = load_file(tiny_model_dir / "model.safetensors")
    for name, value in base.items():
        key = f"policy.{name}"
        if key in one["params"] and one["params"][key].shape == value.shape:  # the update moved weights
            changed += int((one["params"][key] - value).abs().max() > 1e-4)
    assert changed > 0
    for key in ("loss/policy", "loss/value", "policy/approx_kl", "policy/clipfrac", "policy/entropy"):
        assert two["stats"][key] == pytest.approx(one["stats"][key], rel=1e-4, abs=1e-6), key


@pytest.mark.parametrize("stage", ["sft", "reward"])
def test_stage_over_two_processes_equals_one(stage, tiny_model_dir, tiny_data, tmp_path):
    # Dropout draws different masks in one process than in two: the comparison needs it off.
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    model.save_pretrained(tmp_path / "base")
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(tmp_path / "base")
    data = tiny_data["sft" if stage == "sft" else "prefs"]
    common = [
        "-m", "rlhf", stage, f"{stage}.model={tmp_path / 'base'}", f"{stage}.data.train=[{data}]", f"{stage}.precision=fp32",
        f"{stage}.optim.batch_size=8", f"{stage}.optim.micro_batch_size=2", f"{stage}.optim.max_steps=3",
        f"{stage}.optim.lr=1e-3", f"{stage}.eval_every=3", f"{stage}.log_every=1",
    ]
    launch([*common, f"{stage}.output_dir={tmp_path / 'one'}"], 1, tmp_path)
    launch([*common, f"{stage}.output_dir={tmp_path / 'two'}"], 2, tmp_path)
    one, two = load_file(tmp_path / "one" / "model" / "model.safetensors"), load_file(tmp_path / "two" / "model" / "model.safetensors")
    # Adam divides each gradient coordinate by its own magnitude: float rounding in a near-zero
    # coordinate (sums in another order) can move that weight by a small fraction of lr = 1e-3.
    for name, value in one.items():
        torch.testing.assert_close(two[name], value, atol=5e-5, rtol=1e-4, msg=name)
    a, b = read_metrics(tmp_path / "one"), read_metrics(tmp_path / "two")
    assert [m["step"] for m in b] == [1, 2, 3]  # one line a step: only the main process writes
    for x, y in zip(a, b):
        assert y["train/loss"] == pytest.approx(x["train/loss"], rel=1e-4)


def test_each_process_samples_its_own_completions(tiny_model_dir, tmp_path):
    prompts = tmp_path / "same.jsonl"
    prompts.write_text('{"prompt": "User: How do I get help with my refund?\\nAssistant:"}\n' * 8)
    launch([str(HERE / "distributed_sampling.py"), str(tiny_model_dir), str(prompts), str(tmp_path / "run")], 2, tmp_path)
    first, second = torch.load(tmp_path / "run" / "responses-0.pt"), torch.load(tmp_path / "run" / "responses-1.pt")
    assert first.shape[0] == second.shape[0] == 4
    width = min(first.shape[1], second.shape[1])
    assert not torch.equal(first[:, :width], second[:, :width])  # the same rows of the same prompt
