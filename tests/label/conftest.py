"""Shared set-up for the labeling app tests: projects on disk, an in-process client, a real server."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from starlette.testclient import TestClient

from rlhf.label.app import create_app
from rlhf.data import load_candidates
from rlhf.label.db import Project, Store, build_items

from .browser import CHROMIUM_FLAGS, chromium_path

ROOT = Path(__file__).resolve().parents[2]


def write_candidates(path: Path, records: list[tuple[str, list[str]]]) -> Path:
    with path.open("w", encoding="utf-8") as f:
        for prompt, texts in records:
            candidates = [{"completion": t, "model": "tiny", "sampling": {"temperature": 1.0}} for t in texts]
            f.write(json.dumps({"prompt": prompt, "candidates": candidates}) + "\n")
    return path


def make_project(tmp_path: Path, task: str, records, overlap: int = 1, scale: str = "thumbs", name="feedback") -> Path:
    """A project file with items from `records` [(prompt, [completions])], as `serve` makes it."""
    db = tmp_path / f"{name}.sqlite"
    store = Store(db)
    project = store.set_project(Project(task, overlap, scale))
    items, _ = build_items(list(load_candidates(write_candidates(tmp_path / f"{name}.jsonl", records))), project.task)
    store.add_items(items)
    store.close()
    return db


def invite(db: Path, name: str, admin: bool = False) -> str:
    token, _ = Store(db).add_labeler(name, is_admin=admin)
    return token


CSRF = re.compile(r'name="csrf" value="([^"]+)"')
ITEM = re.compile(r'action="[^"]*/items/(\d+)/answer"')
KEY = re.compile(r'name="key" value="([^"]+)"')


class Labeler:
    """A signed-in labeler driving the app over HTTP as a browser without JavaScript would."""

    def __init__(self, client: httpx.Client | TestClient, token: str):
        self.client = client
        r = client.post("/login", data={"token": token}, follow_redirects=False)
        assert r.status_code == 303, r.text
        self.page = ""
        self.csrf = CSRF.search(self.open().text).group(1)

    def open(self):
        r = self.client.get("/label", headers={"accept": "text/html"})
        assert r.status_code == 200, r.text
        self.page = r.text
        return r

    @property
    def item_id(self) -> int:
        return int(ITEM.search(self.page).group(1))

    def candidate_at(self, side: str) -> int:
        """The item's completion index shown as A or B on the current page."""
        return int(re.search(rf'data-side="{side}" data-candidate="(\d+)"', self.page).group(1))

    def answer(self, data: dict, key: str | None = None, **kwargs):
        form = {"csrf": self.csrf, "key": key or KEY.search(self.page).group(1), **data}
        return self.client.post(f"/items/{self.item_id}/answer", data=form, follow_redirects=False, **kwargs)

    def prefer(self, completion: int | str, reason: str = ""):
        """Answer a pair by the item's completion index (0/1), or 'tie'/'skip'."""
        if completion in ("tie", "skip"):
            choice = completion
        else:
            choice = "a" if self.candidate_at("a") == completion else "b"
        r = self.answer({"choice": choice, "reason": reason})
        assert r.status_code == 303, r.text
        self.open()
        return r


@pytest.fixture
def client_for():
    """client_for(db) -> an in-process TestClient of the app on that project."""
    clients = []

    def make(db: Path) -> TestClient:
        client = TestClient(create_app(db), base_url="http://testserver")
        clients.append(client)
        return client

    yield make
    for client in clients:
        client.close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`python -m rlhf.label serve` in a subprocess on a free loopback port."""

    def __init__(self, db: Path, log: Path, args: tuple[str, ...] = ()):
        self.db, self.log, self.port, self.args = db, log, free_port(), args
        self.url = f"http://127.0.0.1:{self.port}"
        self.process: subprocess.Popen | None = None

    def start(self) -> "Server":
        # No --task/--overlap/--scale: serve keeps the settings the project file holds.
        cmd = [sys.executable, "-m", "rlhf.label", "serve", "--db", str(self.db), "--port", str(self.port), *self.args]
        self.process = subprocess.Popen(cmd, cwd=ROOT, stdout=self.log.open("ab"), stderr=subprocess.STDOUT,
                                        env={**os.environ, "PYTHONUNBUFFERED": "1"})
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"server exited: {self.log.read_text()}")
            try:
                httpx.get(self.url + "/login", timeout=1)
                return self
            except httpx.TransportError:
                time.sleep(0.1)
        raise RuntimeError("server did not start in 30 s")

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


@pytest.fixture
def serve(tmp_path):
    """serve(db, *flags) -> a running Server; stopped at the end of the test."""
    servers = []

    def start(db: Path, *args: str) -> Server:
        server = Server(db, tmp_path / f"server-{len(servers)}.log", args).start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.stop()


@pytest.fixture(scope="module")
def browser():
    path = chromium_path()
    if path is None:
        if os.environ.get("RLHF_REQUIRE_BROWSER") == "1":
            pytest.fail("chromium is not installed (apt-get install chromium); RLHF_REQUIRE_BROWSER=1")
        pytest.skip("chromium is not installed (apt-get install chromium)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        # launch() gives every run a fresh, empty profile (user data dir) of its own.
        browser = playwright.chromium.launch(executable_path=path, args=CHROMIUM_FLAGS, headless=True)
        yield browser
        browser.close()
