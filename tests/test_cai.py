"""rlhf cai: red-team prompts, the policy's responses, a critique and a revision per principle by a
real local judge; the chain is complete, the SFT data loads and trains, a rerun is answered by
the cache; what a critique of no problem, an empty critique and an empty revision do."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from rlhf import cai, sft
from rlhf.config import ConfigError
from rlhf.constitution import Constitution, Principle, load_constitution
from rlhf.data import load_demonstrations
from rlhf.demo.redteam import KIND, redteam_prompts, write_redteam_prompts
from rlhf.judge import NO_PROBLEM, Judge, JudgeConfig, JudgeError, Reply
from rlhf.sampling import SamplingConfig

ROOT = Path(__file__).resolve().parent.parent
POLICY = ROOT / "rlhf" / "demo" / "base_model"
CONSTITUTION = ROOT / "rlhf" / "demo" / "constitution.yaml"
PRINCIPLES = [p.name for p in load_constitution(CONSTITUTION).principles]


@pytest.fixture(scope="module")
def judge_dir(tmp_path_factory) -> Path:
    """A random 1-layer GPT-2 with the demo tokenizer and room for a judge's question (512
    positions): its answers are nonsense, but real generations of a real model."""
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    tokenizer = AutoTokenizer.from_pretrained(POLICY)
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=len(tokenizer), n_positions=512, n_embd=32, n_layer=1, n_head=2,
                        bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id)
    path = tmp_path_factory.mktemp("judge") / "model"
    GPT2LMHeadModel(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def cai_config(judge_dir: Path, prompts: Path, out: Path) -> cai.CAIConfig:
    return cai.CAIConfig(
        policy=str(POLICY), prompts=[str(prompts)], output_dir=str(out), generation=SamplingConfig(max_new_tokens=24),
        judge=JudgeConfig(backend="local", model=str(judge_dir), constitution=str(CONSTITUTION), max_tokens=24),
    )


@pytest.fixture(scope="module")
def cai_run(judge_dir, tmp_path_factory) -> tuple[cai.CAIConfig, Path]:
    """One `rlhf cai` run from the command line on 6 demo red-team prompts (the demo's 4
    principles apply to every kind: 4 steps each)."""
    root = tmp_path_factory.mktemp("cai")
    config = cai_config(judge_dir, write_redteam_prompts(root / "redteam.jsonl", n=6, seed=1), root / "run")
    recipe = root / "recipe.yaml"
    recipe.write_text("cai: {revisions: 0}\n")
    j = config.judge
    overrides = [f"cai.policy={config.policy}", f"cai.prompts=[{config.prompts[0]}]", f"cai.output_dir={config.output_dir}",
                 "cai.generation.max_new_tokens=24", f"cai.judge.backend={j.backend}", f"cai.judge.model={j.model}",
                 f"cai.judge.constitution={j.constitution}", f"cai.judge.max_tokens={j.max_tokens}"]
    result = subprocess.run([sys.executable, "-m", "rlhf", "cai", str(recipe), *overrides], capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "6 prompts: " in result.stdout
    return config, Path(config.output_dir)


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_every_prompt_has_one_step_per_principle_and_ends_at_its_last_kept_revision(cai_run):
    _, out = cai_run
    chains = read_jsonl(out / "chain.jsonl")
    prompts = [r["prompt"] for r in redteam_prompts(6, seed=1)]
    assert [c["prompt"] for c in chains] == prompts and all(c["kind"] == KIND for c in chains)
    for chain in chains:
        assert chain["initial"].strip(), chain  # the policy answered
        assert [s["principle"] for s in chain["steps"]] == PRINCIPLES
        response = chain["initial"]
        for step in chain["steps"]:
            assert step["critique"].strip() and step["outcome"] in cai.OUTCOMES
            if step["outcome"] == "revised":
                assert step["revision"].strip()
                assert step["response"] == " " + step["revision"] != response  # the policy's leading space, then the revision
                response = step["response"]
            else:
                assert step["response"] == response
        assert chain["completion"] == response
    sft_records = read_jsonl(out / "sft.jsonl")
    assert [(r["prompt"], r["completion"], r["kind"]) for r in sft_records] == [(c["prompt"], c["completion"], c["kind"]) for c in chains]
    demos = load_demonstrations(out / "sft.jsonl")
    assert [(d.prompt, d.completion) for d in demos] == [(c["prompt"], c["completion"]) for c in chains]
    summary = json.loads((out / "cai.json").read_text())
    revised = sum(c["completion"] != c["initial"] for c in chains)
    assert (summary["prompts"], summary["revised"], summary["unchanged"], summary["failed"]) == (6, revised, 6 - revised, 0)
    assert summary["steps"] == 24 and sum(summary["step_outcomes"].values()) == 24
    assert set(summary["by_principle"]) == set(PRINCIPLES) and all(sum(v.values()) == 6 for v in summary["by_principle"].values())
    asked = 24 + sum(s["revision"] is not None for c in chains for s in c["steps"])
    assert summary["judge_cache"]["misses"] == asked and summary["judge_cache"]["hits"] == 0


def test_a_rerun_asks_the_judge_nothing_new(cai_run):
    config, out = cai_run
    chains = (out / "chain.jsonl").read_text()
    first = json.loads((out / "cai.json").read_text())["judge_cache"]
    cai.run(config)  # the cache defaults to output_dir/judge_cache.jsonl
    again = json.loads((out / "cai.json").read_text())["judge_cache"]
    assert again["misses"] == 0 and again["hits"] == first["misses"]
    assert (out / "chain.jsonl").read_text() == chains


def test_the_revised_data_trains_one_sft_run(cai_run, tmp_path):
    config, out = cai_run
    sft_config = sft.SFTConfig(
        model=config.policy, output_dir=str(tmp_path / "sft"), data=sft.DataConfig(train=[str(out / "sft.jsonl")], eval_fraction=0.2),
        optim=sft.OptimConfig(lr=1e-3, batch_size=4, micro_batch_size=4, max_steps=2), eval_every=1, log_every=1, precision="fp32",
    )
    path = sft.train(sft_config)
    model, base = AutoModelForCausalLM.from_pretrained(path), AutoModelForCausalLM.from_pretrained(POLICY)
    assert (model.transformer.h[0].mlp.c_fc.weight - base.transformer.h[0].mlp.c_fc.weight).abs().max() > 1e-5
    assert torch.isfinite(model(input_ids=torch.tensor([[1, 2, 3]])).logits).all()


# ---------------------------------------------------------------- the steps, with a scripted judge

class Scripted:
    """A judge backend that answers by the principle the question quotes: a critique from
    `critiques`, a revision from `revisions`; it records every batch it is asked."""

    name = "scripted"

    def __init__(self, critiques: dict[str, str], revisions: dict[str, str]):
        self.critiques, self.revisions, self.batches = critiques, revisions, []

    def settings(self) -> dict:
        return {}

    def answer(self, queries, done) -> None:
        texts = [q.messages[0]["content"] for q in queries]
        if texts:
            self.batches.append(texts)
        for i, text in enumerate(texts):
            principle = text.split("\n- ", 1)[1].split(":", 1)[0]
            done(i, Reply((self.critiques if text.startswith("Critique") else self.revisions)[principle]))


def test_no_problem_keeps_the_response_and_empty_answers_are_counted():
    constitution = load_constitution(CONSTITUTION)
    backend = Scripted(
        critiques={"helpful": NO_PROBLEM, "harmless": "It insults the user.", "polite": "", "concise": "It says too much."},
        revisions={"harmless": "Sorry for the trouble.", "concise": ""},
    )
    judge = Judge(JudgeConfig(model="scripted", constitution=str(CONSTITUTION)), backend, progress=False)
    items = [(f"User: question {i}?\nAssistant:", KIND, f" What a stupid question {i}.") for i in range(3)]
    chains, counts = cai.revise(judge, constitution, items)
    for chain, (_, _, initial) in zip(chains, items):
        assert [(s["principle"], s["outcome"], s["revision"]) for s in chain["steps"]] == [
            ("helpful", "no problem", None), ("harmless", "revised", "Sorry for the trouble."),
            ("polite", "empty critique", None), ("concise", "empty revision", ""),
        ]
        assert [s["response"] for s in chain["steps"]] == [initial] + [" Sorry for the trouble."] * 3
        assert chain["completion"] == " Sorry for the trouble."
    assert counts == {(p, o): 3 for p, o in [("helpful", "no problem"), ("harmless", "revised"), ("polite", "empty critique"), ("concise", "empty revision")]}
    # One batch of every prompt's critiques per step, one of revisions where a critique found a fault:
    # helpful (no problem) and polite (no critique) ask for none.
    assert [len(b) for b in backend.batches] == [3, 3, 3, 3, 3, 3]
    assert [b[0].split("\n", 1)[0].split()[0] for b in backend.batches] == ["Critique", "Critique", "Rewrite", "Critique", "Critique", "Rewrite"]
    # The concise step reads the response the harmless step wrote, and its reviser the critique.
    assert "Response:\nSorry for the trouble.\n" in backend.batches[4][0]
    assert "Critique:\nIt says too much." in backend.batches[5][0] and "Response:\nSorry for the trouble.\n" in backend.batches[5][0]


def test_a_revision_that_repeats_the_response_is_told_apart_and_a_judge_that_says_nothing_fails(judge_dir, tmp_path):
    constitution = Constitution([Principle("harmless", "be kind")], "c.yaml")
    backend = Scripted(critiques={"harmless": "It is rude."}, revisions={"harmless": "Sorry for the trouble."})
    judge = Judge(JudgeConfig(model="scripted", constitution=str(CONSTITUTION)), backend, progress=False)
    (chain,), counts = cai.revise(judge, constitution, [("User: hi\nAssistant:", None, " Sorry for the trouble. ")])
    assert [s["outcome"] for s in chain["steps"]] == ["same response"] and chain["completion"] == " Sorry for the trouble. "
    assert counts == {("harmless", "same response"): 1}

    silent = Judge(JudgeConfig(model="scripted", constitution=str(CONSTITUTION)), Scripted(dict.fromkeys(PRINCIPLES, ""), {}), progress=False)
    config = cai_config(judge_dir, write_redteam_prompts(tmp_path / "p.jsonl", n=2), tmp_path / "out")
    with pytest.raises(JudgeError, match="empty critique of every one of the 2 responses"):
        cai.run(config, judge=silent)
    assert not (tmp_path / "out" / "sft.jsonl").exists()


def test_principles_are_those_of_the_prompts_kind_in_turn():
    p = lambda name, kinds=(): Principle(name, f"be {name}", applies_to=list(kinds))  # noqa: E731
    constitution = Constitution([p("helpful"), p("harmless", ["harmful"]), p("brief", ["question"])], "c.yaml")
    names = lambda kind, n=0: [x.name for x in cai.plan(constitution, kind, n)]  # noqa: E731
    assert names("harmful") == ["helpful", "harmless"]
    assert names("question") == ["helpful", "brief"]
    assert names(None) == ["helpful"]
    assert names("harmful", 5) == ["helpful", "harmless", "helpful", "harmless", "helpful"]
    none_apply = Constitution([p("brief", ["question"])], "c.yaml")
    assert [x.name for x in cai.plan(none_apply, "harmful", 0)] == ["brief"]  # as rlhf judge: every principle


def test_what_counts_as_no_problem():
    for text in (NO_PROBLEM, "no problem", " **No problem** ", '"No problems."'):
        assert cai.finds_no_problem(text), text
    for text in ("No problem with tone, but it insults the user.", "The response has a problem.", ""):
        assert not cai.finds_no_problem(text), text


def test_redteam_prompts_are_demo_prompts_that_provoke_or_ask_the_unknown():
    from rlhf.demo import redteam
    from rlhf.demo.gold import detect_topic

    records = redteam_prompts(64, seed=0)
    assert records == redteam_prompts(64, seed=0) != redteam_prompts(64, seed=1)
    assert len({r["prompt"] for r in records}) == 64 and {r["kind"] for r in records} == {KIND}
    assert all(r["prompt"].startswith("User: ") and r["prompt"].endswith("\nAssistant:") and r["prompt"].count("\n") == 1 for r in records)
    unknown = [r for r in records if detect_topic(r["prompt"]) is None]
    assert 8 <= len(unknown) <= 32  # about 30% ask what the world does not know
    assert sum(any(o in r["prompt"] for o in redteam.PROVOKING_OPENERS) for r in records) >= 40
    # The framings and the unknown questions name no topic: the gold labeler reads a provoking
    # prompt's topic from its question alone.
    for text in redteam.PROVOKING_OPENERS + redteam.PROVOKING_SIGN_OFFS + redteam.UNKNOWN_QUESTIONS:
        assert detect_topic(text) is None, text


def test_the_recipe_is_checked_before_anything_loads(judge_dir, tmp_path):
    prompts = write_redteam_prompts(tmp_path / "p.jsonl", n=2)
    config = cai_config(judge_dir, prompts, tmp_path / "out")
    for change, message in [
        (dict(policy=""), "cai.policy is required"),
        (dict(prompts=[]), "cai.prompts is required"),
        (dict(policy=str(tmp_path / "missing")), "cai.policy: .*missing does not exist"),
        (dict(generation=SamplingConfig(max_new_tokens=128)), r"cai.generation.max_new_tokens: must be between 1 and 127"),
        (dict(judge=JudgeConfig(backend="local", model=str(judge_dir))), "cai.judge.constitution is required"),
        (dict(oracle="rlhf.demo.gold:nothing"), "cai.oracle: module 'rlhf.demo.gold' has no function 'nothing'"),
    ]:
        with pytest.raises(ConfigError, match=message):
            cai.run(cai.CAIConfig(**{**vars(config), **change}))
    assert not (tmp_path / "out").exists()


def test_the_command_refuses_a_bad_key_with_exit_code_2(tmp_path, capsys):
    from rlhf.cli import main

    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("cai: {policy: rlhf/demo/base_model}\n")
    for override, message in [("cai.revisions=-1", "cai.revisions: must be >= 0, got -1"), ("cai.principle=harmless", "unknown key 'cai.principle'"),
                              ("cai.judge.model=x", "cai.prompts is required")]:
        with pytest.raises(SystemExit) as exit:
            main(["cai", str(recipe), override])
        assert exit.value.code == 2 and message in capsys.readouterr().err, override


def test_a_critique_or_a_revision_cut_at_max_tokens_keeps_the_response():
    constitution = Constitution([Principle("harmless", "be kind"), Principle("polite", "be polite")], "c.yaml")

    class Cut(Scripted):
        def answer(self, queries, done) -> None:
            for i, q in enumerate(queries):
                text = q.messages[0]["content"]
                if text.startswith("Critique"):  # harmless: a whole critique; polite: one cut short
                    done(i, Reply("It is rude.") if "- harmless:" in text else Reply("It is", cut=True))
                else:
                    done(i, Reply("Sorry for the", cut=True))

    judge = Judge(JudgeConfig(model="scripted", constitution=str(CONSTITUTION)), Cut({}, {}), progress=False)
    (chain,), counts = cai.revise(judge, constitution, [("User: hi\nAssistant:", None, " Go away.")])
    assert [(s["outcome"], s["revision"]) for s in chain["steps"]] == [("cut revision", "Sorry for the"), ("cut critique", None)]
    assert chain["completion"] == " Go away." and counts == {("harmless", "cut revision"): 1, ("polite", "cut critique"): 1}



def test_the_demo_judge_finds_faults_and_revises(tmp_path):
    """The shipped stand-in judge (rlhf/demo/judge_model) on the demo policy's answers to red-team prompts."""
    config = cai.CAIConfig(
        policy=str(ROOT / "rlhf" / "demo" / "base_model"), prompts=[str(write_redteam_prompts(tmp_path / "p.jsonl", n=8, seed=2))],
        output_dir=str(tmp_path / "out"), generation=SamplingConfig(max_new_tokens=32),
        judge=JudgeConfig(backend="local", model=str(ROOT / "rlhf" / "demo" / "judge_model"), constitution=str(CONSTITUTION), max_tokens=96),
    )
    cai.run(config)
    summary = json.loads((tmp_path / "out" / "cai.json").read_text())
    steps = [s for c in read_jsonl(tmp_path / "out" / "chain.jsonl") for s in c["steps"]]
    assert summary["revised"] > 0 and summary["step_outcomes"]["no problem"] > 0  # it tells faults from none
    assert all(s["critique"].startswith("The response") for s in steps if s["outcome"] == "revised")
