"""The demo base model: a tiny GPT-2 pretrained from scratch on the demo corpus, shipped in the package.

    python -m rlhf.demo.base --out rlhf/demo/base_model    # rebuilds the shipped model

It plays the part a pretrained LM plays in real RLHF: it writes fluent exchanges of every
quality (`corpus.PRETRAIN_MIX`), helpful or not, polite or rude, and knows to stop. A byte-level
BPE tokenizer is trained on the corpus (every word of it fits in 1,144 tokens, under the 2k
cap); like GPT-2's it has `<|endoftext|>` as BOS and EOS and no pad token (the training stages
add a distinct one). The model is a 4-layer, 256-wide GPT-2 (3.5M parameters) trained for one
pass over 8,000 exchanges, each `prompt + completion + <|endoftext|>`, on the prompts outside
the held-out evaluation set. About two minutes on 2 CPU cores; the result is saved with
`save_pretrained` and loads with plain `AutoModelForCausalLM` / `AutoTokenizer`. Training runs
under bf16 autocast only on CPUs with AMX: on AVX2-only CPUs bf16 is emulated and several times
slower than fp32.
"""

from __future__ import annotations

import argparse
import math
import random
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from tqdm import tqdm
from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

from rlhf.demo.corpus import PRETRAIN_MIX, sample_exchange, split_questions
from rlhf.training import use_bf16

EOS = "<|endoftext|>"
SEED = 0
EXAMPLES = 8000
BATCH_SIZE = 16
LR = 2e-3
WARMUP_STEPS = 20
VOCAB_SIZE = 2048
N_POSITIONS = 128


def base_model_path() -> Path:
    """The shipped base model: a directory that `from_pretrained` reads."""
    return Path(__file__).parent / "base_model"


def train_tokenizer(texts: list[str]) -> PreTrainedTokenizerFast:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token=EOS, eos_token=EOS, unk_token=EOS, model_max_length=N_POSITIONS
    )


def pretrain(out_dir: str | Path) -> None:
    torch.manual_seed(SEED)
    rng = random.Random(SEED)
    train_questions, _ = split_questions()
    texts = []
    for _ in range(EXAMPLES):
        exchange = sample_exchange(rng, PRETRAIN_MIX, train_questions)
        texts.append(exchange.prompt + exchange.completion)
    tokenizer = train_tokenizer(texts)
    sequences = [ids + [tokenizer.eos_token_id] for ids in tokenizer(texts).input_ids]

    config = GPT2Config(
        vocab_size=len(tokenizer),
        n_positions=N_POSITIONS,
        n_embd=256,
        n_layer=4,
        n_head=4,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    model = GPT2LMHeadModel(config)
    decay = [p for p in model.parameters() if p.dim() >= 2]  # weight decay on matrices only
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}], lr=LR, betas=(0.9, 0.95)
    )
    steps = len(sequences) // BATCH_SIZE
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda step: min(1.0, (step + 1) / WARMUP_STEPS) * 0.5 * (1 + math.cos(math.pi * step / steps)),
    )
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=use_bf16("auto", torch.device("cpu")))

    model.train()
    order = torch.randperm(len(sequences)).tolist()
    progress = tqdm(range(steps), desc="pretraining the demo base model")
    for step in progress:
        batch = [sequences[i] for i in order[step * BATCH_SIZE : (step + 1) * BATCH_SIZE]]
        width = max(len(ids) for ids in batch)
        input_ids = torch.tensor([ids + [tokenizer.eos_token_id] * (width - len(ids)) for ids in batch])
        attention_mask = torch.tensor([[1] * len(ids) + [0] * (width - len(ids)) for ids in batch])
        labels = input_ids.masked_fill(attention_mask == 0, -100)
        with autocast:
            loss = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        progress.set_postfix(loss=f"{loss.item():.3f}")

    model.eval()
    out_dir = Path(out_dir)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="directory to write the model and tokenizer to")
    pretrain(parser.parse_args(argv).out)


if __name__ == "__main__":
    main()
