"""rlhf: the whole RLHF loop on one machine, SFT, feedback, reward model, PPO and evaluation."""

import os

# OpenMP threads that spin while waiting make a process crawl when another one shares its cores
# (measured here: 590 ms against 6 ms for a small training step). Set before torch loads.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

__version__ = "0.1.0"
