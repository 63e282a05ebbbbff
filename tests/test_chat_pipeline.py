"""A chat model through the whole loop from the command line: `rlhf pipeline` on a tiny Qwen2
shaped as Qwen2.5-Instruct ships (turns closed by <|im_end|>, EOS <|endoftext|>, no pad token, a
generation config that stops at both), on conversations in every stage.

SFT teaches one short reply closed by <|im_end|>; the reward model trains on pairs given with an
explicit prompt and on hh-rlhf's whole conversations; PPO and eval roll out on the rendered
conversations and must stop at the turn end, which the tokenizer's EOS alone would not do.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import TOPICS, conversation_for, turn_end_tokenizer, write_jsonl

ROOT = Path(__file__).resolve().parents[1]
REPLY, WORSE = "Happy to help.", "Whatever."
GENERATION_PROMPT = "<|im_start|>assistant\n"


@pytest.fixture(scope="module")
def instruct_dir(tmp_path_factory) -> Path:
    """A random 2-layer Qwen2 with a Qwen2 tokenizer: EOS <|endoftext|>, no pad, generation config EOS [<|im_end|>, <|endoftext|>]."""
    import torch
    from transformers import GenerationConfig, Qwen2Config, Qwen2ForCausalLM

    texts = [f"user\nHow do I get help with my {t}?\nassistant\n{REPLY} {WORSE}" for t in TOPICS]
    tokenizer = turn_end_tokenizer(texts, vocab_size=320)
    assert tokenizer.pad_token_id is None
    stops = tokenizer.convert_tokens_to_ids(["<|im_end|>", "<|endoftext|>"])
    config = Qwen2Config(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=64, eos_token_id=stops, bos_token_id=None,
    )
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(config)
    model.generation_config = GenerationConfig(eos_token_id=stops)
    path = tmp_path_factory.mktemp("instruct") / "base"
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def test_a_chat_model_goes_through_every_stage_on_conversations(instruct_dir, tmp_path):
    from transformers import AutoTokenizer, GenerationConfig

    from rlhf.data import load_feedback
    from rlhf.encoding import render_prompt
    from rlhf.models import context_length, stop_token_ids
    from rlhf.reward import encode_feedback
    from rlhf.scoring import SequenceClassifierScore

    turn = lambda text: [{"role": "assistant", "content": text}]  # noqa: E731
    topics = list(TOPICS)
    sft_data = write_jsonl(tmp_path / "sft.jsonl", [{"messages": conversation_for(t) + turn(REPLY)} for t in topics for _ in range(4)])
    explicit = [{"prompt": conversation_for(t), "chosen": turn(REPLY), "rejected": turn(WORSE)} for t in topics]
    implicit = [{"chosen": conversation_for(t) + turn(REPLY), "rejected": conversation_for(t) + turn(WORSE)} for t in topics]  # hh-rlhf
    prefs = write_jsonl(tmp_path / "prefs.jsonl", (explicit + implicit) * 2)
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": conversation_for(t)} for t in topics])
    runs = tmp_path / "runs"
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"""
sft:
  model: {instruct_dir}
  output_dir: {runs}/sft
  data: {{train: [{sft_data}], eval_fraction: 0.05}}
  optim: {{lr: 1e-2, batch_size: 8, micro_batch_size: 8, epochs: 60}}
  precision: fp32
  log_every: 20
reward:
  model: {runs}/sft/model
  output_dir: {runs}/reward
  data: {{train: [{prefs}], eval_fraction: 0.2}}
  optim: {{lr: 1e-3, batch_size: 8, micro_batch_size: 8, epochs: 1}}
  precision: fp32
ppo:
  policy: {runs}/sft/model
  output_dir: {runs}/ppo
  prompts: {{train: [{prompts}]}}
  reward: {{kind: model, path: {runs}/reward/model}}
  generation: {{max_new_tokens: 8}}
  algo: {{batch_size: 4, minibatch_size: 4, micro_batch_size: 4, epochs: 1}}
  stop: {{max_steps: 2}}
  precision: fp32
eval:
  reference: {runs}/sft/model
  policies: [{runs}/ppo/model]
  prompts: [{prompts}]
  reward: {{kind: model, path: {runs}/reward/model}}
  generation: {{max_new_tokens: 8}}
  runs: [{runs}/ppo]
  output_dir: {runs}/eval
""")
    # run from the repository root: the rlhf package beside these tests is the one imported
    result = subprocess.run([sys.executable, "-m", "rlhf", "pipeline", str(recipe)], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]

    tokenizer = AutoTokenizer.from_pretrained(runs / "ppo" / "model")
    im_end, endoftext = tokenizer.convert_tokens_to_ids(["<|im_end|>", "<|endoftext|>"])
    # (a) rollouts are on the conversations, rendered up to the assistant's generation prompt
    samples = [json.loads(line) for line in (runs / "ppo" / "samples.jsonl").read_text().splitlines()]
    assert samples and all(s["prompt"] in [conversation_for(t) for t in topics] for s in samples)
    generation_prompt = tokenizer(GENERATION_PROMPT, add_special_tokens=False)["input_ids"]
    for s in samples:
        assert render_prompt(tokenizer, s["prompt"])[-len(generation_prompt) :] == generation_prompt
    # (b) every rollout stops at <|im_end|>, in PPO and in eval
    metrics = [json.loads(line) for line in (runs / "ppo" / "metrics.jsonl").read_text().splitlines()]
    assert [m["response/eos_fraction"] for m in metrics if "response/eos_fraction" in m] == [1.0, 1.0]
    assert all(s["ended"] for s in samples), samples
    summary = json.loads((runs / "eval" / "results.json").read_text())
    assert [row["eos_fraction"] for row in summary] == [1.0, 1.0]
    report = (runs / "eval" / "report.md").read_text()
    assert all(line.rstrip().endswith("| 100.0% |") for line in report.splitlines() if line.startswith(f"| {runs}/")), report
    # (c) the saved reward model scores the sequences it was trained on, for both forms of pair
    scorer = SequenceClassifierScore.from_pretrained(str(runs / "reward" / "model"))
    for pair in load_feedback([str(prefs)])[: len(explicit) + len(implicit)]:
        trained = encode_feedback(scorer.tokenizer, pair, context_length(scorer.model.config)).sequences
        assert [scorer.encode(pair.prompt, c) for c in pair.completions] == trained
        assert [scorer.encode(pair.prompt, c[0]["content"]) for c in pair.completions] == trained  # PPO hands it decoded text
        assert all(sequence[-1] == im_end for sequence in trained)
    # (d) the saved policies keep the generation config's stop list; (e) pad is none of the stop tokens
    for stage in ("sft", "ppo"):
        saved = json.loads((runs / stage / "model" / "generation_config.json").read_text())
        assert saved["eos_token_id"] == [im_end, endoftext], stage
        stage_tokenizer = AutoTokenizer.from_pretrained(runs / stage / "model")
        assert stage_tokenizer.pad_token_id is not None
        assert stage_tokenizer.pad_token_id not in {im_end, endoftext, stage_tokenizer.eos_token_id}
        assert stop_token_ids(stage_tokenizer, GenerationConfig.from_pretrained(runs / stage / "model")) == sorted([im_end, endoftext])
