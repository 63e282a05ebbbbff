"""What the stages share: the random streams a checkpoint saves and restores."""

from __future__ import annotations

import random

import torch

from rlhf import training


def test_checkpointed_random_streams_include_the_gpu(monkeypatch):
    # No GPU here: torch.cuda's state functions are replaced by a stand-in for this process's device.
    gpu = {"state": torch.tensor([1, 2, 3], dtype=torch.uint8)}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda: gpu["state"].clone())
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda state: gpu.update(state=state))
    state = training.rng_state()
    expected = (random.random(), torch.rand(3))
    gpu["state"] = torch.tensor([9, 9, 9], dtype=torch.uint8)  # the GPU stream moves on
    training.set_rng_state(state)
    assert gpu["state"].tolist() == [1, 2, 3]
    assert random.random() == expected[0] and torch.equal(torch.rand(3), expected[1])


def test_each_process_resumes_with_its_own_random_streams(tmp_path):
    # What the main process writes for two processes; process 1 must get process 1's streams.
    torch.manual_seed(1)
    first = training.rng_state()
    torch.manual_seed(2)
    second = training.rng_state()
    (tmp_path / "ckpt").mkdir()
    torch.save({"step": 3, "rng": [first, second]}, tmp_path / "ckpt" / "state.pt")
    torch.manual_seed(0)
    training.load_state(tmp_path / "ckpt", process_index=1)
    torch.manual_seed(2)
    expected = torch.rand(4)
    training.load_state(tmp_path / "ckpt", process_index=1)
    assert torch.equal(torch.rand(4), expected)


def test_resuming_drops_the_lines_after_the_checkpoint_and_a_line_cut_short(tmp_path):
    from rlhf.tracking import keep_steps_until

    path = tmp_path / "samples.jsonl"
    path.write_text('{"step": 1, "x": 1}\n{"step": 2, "x": 2}\n{"step": 3, "x": 3}\n{"step": 4, "x"')  # killed mid-line
    keep_steps_until(path, 2)
    assert path.read_text() == '{"step": 1, "x": 1}\n{"step": 2, "x": 2}\n'
    keep_steps_until(path, 0)  # a fresh start
    assert not path.exists()


def test_the_optimiser_is_adamw_fused_and_steps_as_the_per_tensor_loop_does():
    torch.manual_seed(0)
    models = [torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 1)) for _ in range(2)]
    models[1].load_state_dict(models[0].state_dict())
    fused, _ = training.make_optimizer(models[0], training.OptimConfig(lr=1e-2, weight_decay=0.1, schedule="constant"), 10)
    loop = torch.optim.AdamW(models[1].parameters(), lr=1e-2, weight_decay=0.1, foreach=False)
    assert fused.param_groups[0]["fused"] is True
    x = torch.randn(16, 8)
    for _ in range(3):
        for model, optimizer in zip(models, (fused, loop)):
            model(x).square().mean().backward()
            optimizer.step()
            optimizer.zero_grad()
    for a, b in zip(models[0].parameters(), models[1].parameters()):
        assert torch.allclose(a, b, atol=1e-6)
