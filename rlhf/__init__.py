"""rlhf: the whole RLHF loop on one machine, SFT, feedback, reward model, PPO and evaluation."""

__version__ = "0.1.0"
