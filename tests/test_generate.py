"""`rlhf generate`: K candidates per prompt, the sampling settings recorded, readable by the app."""

from __future__ import annotations

import json
import subprocess
import sys

from rlhf.data import load_candidates
from rlhf.generate import generate
from rlhf.sampling import SamplingConfig


def test_generate_writes_k_candidates_per_prompt(tiny_model_dir, tiny_prompts, tmp_path):
    out = tmp_path / "candidates.jsonl"
    result = subprocess.run(
        [sys.executable, "-m", "rlhf", "generate", "--model", str(tiny_model_dir), "--prompts", str(tiny_prompts),
         "--out", str(out), "--num", "3", "--max-new-tokens", "6", "--temperature", "0.9", "--seed", "7"],
        capture_output=True, text=True,
    )
    assert result.returncode == 0, result.stderr
    records = load_candidates(out)
    assert len(records) == 64
    for record in records:
        assert len(record.candidates) == 3
        for candidate in record.candidates:
            assert candidate.model == str(tiny_model_dir)
            assert candidate.sampling == {"temperature": 0.9, "top_p": 1.0, "top_k": 0, "max_new_tokens": 6, "seed": 7}
    assert len({c.completion for r in records for c in r.candidates}) > 64  # sampled, not one greedy answer


def test_a_prompt_too_long_for_the_model_is_named_without_a_traceback(tiny_model_dir, tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "User: hi\\nAssistant:"}\n' + json.dumps({"prompt": "refund " * 60}) + "\n")
    result = subprocess.run(
        [sys.executable, "-m", "rlhf", "generate", "--model", str(tiny_model_dir), "--prompts", str(prompts),
         "--out", str(tmp_path / "c.jsonl"), "--max-new-tokens", "16"],
        capture_output=True, text=True,
    )
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert f"error: {prompts}:2: field 'prompt':" in result.stderr and "the model allows at most 48" in result.stderr


def test_candidates_end_at_the_chat_templates_end_of_turn(turn_end_model_dir, turn_end_prompts, tmp_path):
    # The model answers <|im_end|> (after "hello" to the last prompt), then " world": past the end
    # of turn the text would read " world world ...".
    generate(str(turn_end_model_dir), [str(turn_end_prompts)], tmp_path / "candidates.jsonl", 2, SamplingConfig(temperature=1.0, max_new_tokens=8))
    assert [c.completion for r in load_candidates(tmp_path / "candidates.jsonl") for c in r.candidates] == [""] * 6 + ["hello"] * 2


def test_conversational_prompts_are_rendered_and_kept_as_given(chat_model_dir, tmp_path, monkeypatch):
    from conftest import TOPICS, conversation_for, write_jsonl
    from rlhf import sampling
    from rlhf.generate import generate
    from rlhf.models import load_tokenizer

    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": conversation_for(t)} for t in TOPICS])
    seen, original = [], sampling.sample

    def spy(model, prompt_ids, *args):
        seen.extend(prompt_ids)
        return original(model, prompt_ids, *args)

    monkeypatch.setattr(sampling, "sample", spy)
    generate(str(chat_model_dir), [str(prompts)], tmp_path / "candidates.jsonl", 2, sampling.SamplingConfig(max_new_tokens=4))
    tokenizer = load_tokenizer(str(chat_model_dir))
    generation_prompt = tokenizer("<|im_start|>assistant\n", add_special_tokens=False)["input_ids"]
    assert len(seen) == 2 * len(TOPICS) and all(ids[-len(generation_prompt) :] == generation_prompt for ids in seen)
    assert [r.prompt for r in load_candidates(tmp_path / "candidates.jsonl")] == [conversation_for(t) for t in TOPICS]
