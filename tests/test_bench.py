"""`rlhf bench` runs the library's own stages end to end on a very small workload (not a timing test)."""

from __future__ import annotations

import json
import subprocess
import sys


def test_bench_reports_every_phase_with_its_flops(tmp_path):
    out = tmp_path / "bench.json"
    command = [sys.executable, "-m", "rlhf", "bench", "--batch", "2", "--prompt-tokens", "4", "--new-tokens", "4",
               "--iterations", "1", "--warmup", "0", "--stages", "ppo", "sft", "--json", str(out)]
    result = subprocess.run(command, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "PPO iteration (full)" in result.stdout and "SFT step (full)" in result.stdout
    results = json.loads(out.read_text())
    assert results["peak_gflops"]["fp32"] > 0 and results["peak_gflops"]["bf16"] > 0
    ppo = results["ppo"]["full"]
    assert ppo["iteration_s"]["median"] > 0 and ppo["generated_tokens_per_s"] > 0 and ppo["peak_rss_gb"] > 0
    for phase in ("generate", "score", "value", "reference", "train"):
        assert ppo["phases"][phase]["median"] > 0 and ppo["phases"][phase]["gflop"] > 0, phase
    assert results["sft"]["full"]["tokens_per_s"] > 0 and "reward" not in results
