"""Metrics: one JSON line per logged step in `metrics.jsonl`, and TensorBoard event files in `tb/`.

    tensorboard --logdir runs/demo
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path


class Tracker:
    """Writes metrics of the main process; on other processes (data-parallel ranks) it is silent."""

    def __init__(self, out_dir: str | Path, enabled: bool = True, resume_step: int = 0):
        self.enabled = enabled
        self.path = Path(out_dir) / "metrics.jsonl"
        self._writer = None
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        keep_steps_until(self.path, resume_step)
        from torch.utils.tensorboard import SummaryWriter

        self._writer = SummaryWriter(str(self.path.parent / "tb"), purge_step=resume_step + 1 if resume_step else None)
        self._file = self.path.open("a", encoding="utf-8")

    def log(self, step: int, metrics: dict[str, float]) -> None:
        if not self.enabled:
            return
        clean = {k: float(v) for k, v in metrics.items()}
        self._file.write(json.dumps({"step": step, "time": round(time.time(), 3), **clean}) + "\n")
        self._file.flush()
        for key, value in clean.items():
            if math.isfinite(value):
                self._writer.add_scalar(key, value, step)

    def close(self) -> None:
        if self.enabled:
            self._file.close()
            self._writer.close()


def keep_steps_until(path: Path, step: int) -> None:
    """Drop the lines of a JSONL log (records with a "step") written after `step`, all of them
    for 0: a run resumed from the checkpoint of `step` (or started afresh) logs them again."""
    if not path.exists():
        return
    if not step:
        path.unlink()
        return
    kept = [line for line in path.read_text(encoding="utf-8").splitlines() if _step_of(line) <= step]
    path.write_text("".join(line + "\n" for line in kept), encoding="utf-8")


def _step_of(line: str) -> float:
    """The step of a log line; infinity (dropped) for a line a crash cut short."""
    try:
        return json.loads(line)["step"]
    except (ValueError, KeyError, TypeError):
        return math.inf


def read_metrics(path: str | Path) -> list[dict]:
    """The records of a metrics.jsonl file (or of `path/metrics.jsonl` for a run directory)."""
    path = Path(path)
    if path.is_dir():
        path = path / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
