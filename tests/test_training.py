"""What the stages share: the random streams a checkpoint saves and restores."""

from __future__ import annotations

import random

import torch

from rlhf import training


def test_checkpointed_random_streams_include_every_gpu(monkeypatch):
    # No GPU here: torch.cuda's state functions are replaced by a stand-in with one device.
    gpu = {"state": [torch.tensor([1, 2, 3], dtype=torch.uint8)]}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_rng_state_all", lambda: [s.clone() for s in gpu["state"]])
    monkeypatch.setattr(torch.cuda, "set_rng_state_all", lambda states: gpu.update(state=list(states)))
    state = training.rng_state()
    expected = (random.random(), torch.rand(3))
    gpu["state"] = [torch.tensor([9, 9, 9], dtype=torch.uint8)]  # the GPU stream moves on
    training.set_rng_state(state)
    assert gpu["state"][0].tolist() == [1, 2, 3]
    assert random.random() == expected[0] and torch.equal(torch.rand(3), expected[1])
