"""Load on the labeling app: many labelers answering at once over loopback.

    python benchmarks/label_load.py                        # 50 labelers x 20 answers, overlap 2
    python benchmarks/label_load.py --labelers 10 --answers 5 --repeat
    python benchmarks/label_load.py --workers 2             # two server processes on one file

Starts `python -m rlhf.label serve` on a fresh project in a temporary directory, signs every
labeler in with an invite, then all of them at once fetch their next item and post an answer,
`--answers` times each, as a browser without JavaScript would (GET /label, POST the form, 303).
With `--repeat` every answer is posted twice at the same moment with the same idempotency key,
as a double click or a client retry would. Prints the throughput (distinct answers acknowledged
per second) and latency percentiles of the POSTs, then checks the database: every answer stored
exactly once.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import secrets
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
CSRF = re.compile(r'name="csrf" value="([^"]+)"')
ITEM = re.compile(r'action="[^"]*/items/(\d+)/answer"')


@dataclass
class Load:
    sent: list[str] = field(default_factory=list)
    """Idempotency keys of the answers posted."""
    acknowledged: list[str] = field(default_factory=list)
    """Idempotency keys of the answers the server acknowledged (303)."""
    latencies: list[float] = field(default_factory=list)
    """Seconds per answer POST."""
    errors: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def percentile(self, q: float) -> float:
        ordered = sorted(self.latencies)
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")

    def summary(self) -> dict:
        return {
            "answers": len(self.acknowledged),
            "seconds": round(self.seconds, 3),
            "answers_per_second": round(len(self.acknowledged) / self.seconds, 1) if self.seconds else 0.0,
            "p50_ms": round(1000 * self.percentile(0.50), 1),
            "p99_ms": round(1000 * self.percentile(0.99), 1),
            "max_ms": round(1000 * max(self.latencies, default=float("nan")), 1),
            "errors": len(self.errors),
        }


def make_project(directory: Path, labelers: int, answers: int, overlap: int) -> tuple[Path, list[str]]:
    """A project with exactly enough items for every labeler to give `answers` answers."""
    from rlhf.label.db import Project, Store

    items = labelers * answers // overlap
    db = directory / "load.sqlite"
    store = Store(db)
    store.set_project(Project("pair", overlap, "thumbs"))
    texts = [(f"prompt {i}", [f"one answer to {i}", f"another answer to {i}"], f"load:{i}") for i in range(items)]
    store.add_items(texts)
    tokens = [store.add_labeler(f"labeler-{n:03d}")[0] for n in range(labelers)]
    store.close()
    return db, tokens


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(db: Path, overlap: int, log, workers: int = 1) -> tuple[subprocess.Popen, str]:
    port = free_port()
    cmd = [sys.executable, "-m", "rlhf.label", "serve", "--db", str(db), "--task", "pair",
           "--overlap", str(overlap), "--port", str(port), "--workers", str(workers)]
    process = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError("the server exited at start")
        try:
            httpx.get(url + "/login", timeout=1)
            return process, url
        except httpx.TransportError:
            time.sleep(0.1)
    process.kill()
    raise RuntimeError("the server did not start in 30 s")


async def labeler(client: httpx.AsyncClient, token: str, answers: int, repeat: bool, load: Load,
                  start: asyncio.Event, choice: str = "a") -> None:
    """Sign in, wait for the start, then fetch-and-answer `answers` times; stop at the first error."""
    try:
        await _labeler(client, token, answers, repeat, load, start, choice)
    except httpx.HTTPError as exc:  # the server went away (the crash test kills it)
        load.errors.append(f"{type(exc).__name__}: {exc}")


async def _labeler(client, token, answers, repeat, load, start, choice) -> None:
    r = await client.post("/login", data={"token": token})
    if r.status_code != 303:
        load.errors.append(f"login: {r.status_code}")
        return
    await start.wait()
    for _ in range(answers):
        page = await client.get("/label")
        item = ITEM.search(page.text)
        if page.status_code != 200 or item is None:
            load.errors.append(f"GET /label: {page.status_code} {page.text[:80]!r}")
            return
        key = secrets.token_urlsafe(12)
        form = {"csrf": CSRF.search(page.text).group(1), "key": key, "choice": choice}
        load.sent.append(key)
        posts = [_post(client, f"/items/{item.group(1)}/answer", form, load) for _ in range(2 if repeat else 1)]
        statuses = await asyncio.gather(*posts)
        if any(s != 303 for s in statuses):
            load.errors.append(f"POST answer: {statuses}")
            return
        load.acknowledged.append(key)


async def _post(client: httpx.AsyncClient, path: str, form: dict, load: Load) -> int:
    began = time.perf_counter()
    response = await client.post(path, data=form)
    load.latencies.append(time.perf_counter() - began)
    return response.status_code


async def run_load(url: str, tokens: list[str], answers: int, repeat: bool = False, choice: str = "a",
                   during=None) -> Load:
    """All labelers at once; `seconds` runs from the start signal to the last answer. `during`,
    if given, is a coroutine function called with the Load once the labelers start."""
    load, start = Load(), asyncio.Event()
    limits = httpx.Limits(max_connections=2, max_keepalive_connections=2)
    clients = [httpx.AsyncClient(base_url=url, timeout=60, limits=limits) for _ in tokens]
    try:
        tasks = [
            asyncio.create_task(labeler(c, t, answers, repeat, load, start, choice))
            for c, t in zip(clients, tokens, strict=True)
        ]
        await asyncio.sleep(0)  # let the sign-ins go out
        while sum(1 for c in clients if c.cookies) < len(tokens) and not all(t.done() for t in tasks):
            await asyncio.sleep(0.01)
        began = time.perf_counter()
        start.set()
        await asyncio.gather(*tasks, *([during(load)] if during else []))
        load.seconds = time.perf_counter() - began
    finally:
        await asyncio.gather(*[c.aclose() for c in clients])
    return load


def stored_keys(db: Path) -> list[str]:
    """Idempotency keys of all answers in the database (undone or not), one per row."""
    conn = sqlite3.connect(db)
    try:
        return [k for (k,) in conn.execute("SELECT idempotency_key FROM answers")]
    finally:
        conn.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--labelers", type=int, default=50)
    parser.add_argument("--answers", type=int, default=20, help="answers per labeler")
    parser.add_argument("--overlap", type=int, default=2)
    parser.add_argument("--repeat", action="store_true", help="post every answer twice at once, same key")
    parser.add_argument("--workers", type=int, default=1, help="server processes")
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory() as tmp:
        db, tokens = make_project(Path(tmp), args.labelers, args.answers, args.overlap)
        with open(Path(tmp) / "server.log", "wb") as log:
            process, url = start_server(db, args.overlap, log, args.workers)
            try:
                load = asyncio.run(run_load(url, tokens, args.answers, args.repeat))
            finally:
                process.terminate()
                process.wait(10)
        keys = stored_keys(db)
        summary = load.summary()
        summary["stored"] = len(keys)
        summary["exactly_once"] = sorted(keys) == sorted(load.acknowledged)
        print(json.dumps(summary))
        print(
            f"{args.labelers} labelers x {args.answers} answers{' (each posted twice)' if args.repeat else ''}, "
            f"{args.workers} worker{'s' if args.workers != 1 else ''}: "
            f"{summary['answers_per_second']} answers/s, p50 {summary['p50_ms']} ms, p99 {summary['p99_ms']} ms, "
            f"{summary['stored']} stored for {summary['answers']} acknowledged, {summary['errors']} errors",
            file=sys.stderr,
        )
        return 0 if summary["exactly_once"] and not load.errors else 1


if __name__ == "__main__":
    sys.exit(main())
