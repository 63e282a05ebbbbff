"""Candidate completions for labeling: K samples per prompt from any causal LM.

    rlhf generate --model runs/demo/sft/model --prompts prompts.jsonl --out candidates.jsonl --num 4

A prompt is a string, used as written, or a list of messages, rendered with the model's chat
template and its generation prompt, as every stage renders it (`rlhf.encoding`). Every candidate
records the model and the sampling settings it came from, and the prompt is kept as given; the
file is what `rlhf label serve --candidates` reads.
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import torch

from rlhf.data import Candidate, Candidates, load_prompts, write_jsonl
from rlhf.encoding import encode_prompts
from rlhf.models import context_length, load_causal_lm, load_tokenizer
from rlhf.sampling import SamplingConfig, sample_texts


def generate(model: str, prompts: list[str], out: str | Path, num: int, sampling: SamplingConfig, seed: int = 0, batch_size: int = 32) -> int:
    """Write `num` candidates for every prompt of the prompt files; returns the number of prompts."""
    records = load_prompts(prompts)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    tokenizer = load_tokenizer(model)
    policy = load_causal_lm(model, tokenizer).to(device)
    records, _ = encode_prompts(tokenizer, records, context_length(policy.config) - sampling.max_new_tokens, skip_invalid=False)
    torch.manual_seed(seed)
    texts = [r.prompt for r in records for _ in range(num)]
    completions = sample_texts(policy, tokenizer, texts, sampling, batch_size, desc="generating")
    settings = {k: v for k, v in asdict(sampling).items() if k != "batch_size"} | {"seed": seed}  # batch_size changes no token
    rows = [
        Candidates(r.prompt, [Candidate(c, model, settings) for c in completions[i * num : (i + 1) * num]], r.source, r.kind).to_record()
        for i, r in enumerate(records)
    ]
    write_jsonl(out, rows)
    return len(rows)
