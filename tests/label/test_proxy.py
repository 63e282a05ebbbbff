"""Behind a real reverse proxy: Debian's nginx, started by the test on loopback, terminates TLS
(a self-signed certificate) and serves the app under /label/, passing requests on with its own
Host (the app's address) and X-Forwarded-* headers, as a proxy on another machine does.
A labeler signs in and answers in Chromium; nothing is refused.

nginx and openssl come from Debian (`apt-get install nginx openssl`, done by .ci/run). Where
either is missing the test is skipped, unless RLHF_REQUIRE_BROWSER=1 (set by CI) makes that a failure.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time

import httpx
import pytest

from rlhf.label.db import Store

from .conftest import free_port, make_project
from .test_browser import PAIR_RECORDS, cli, item_on, press, press_sign_in

NGINX_CONF = """
daemon off;
pid {dir}/nginx.pid;
error_log {dir}/error.log;
events {{ }}
http {{
    access_log {dir}/access.log;
    client_body_temp_path {dir}/body;
    proxy_temp_path {dir}/proxy;
    fastcgi_temp_path {dir}/fastcgi;
    uwsgi_temp_path {dir}/uwsgi;
    scgi_temp_path {dir}/scgi;
    server {{
        listen 127.0.0.1:{port} ssl;
        ssl_certificate {dir}/cert.pem;
        ssl_certificate_key {dir}/key.pem;
        location /label/ {{
            proxy_pass http://127.0.0.1:{app_port}/;
            proxy_set_header X-Forwarded-Proto $scheme;
            proxy_set_header X-Forwarded-Host $http_host;
            proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
        }}
    }}
}}
"""


def tool(name: str) -> str:
    path = shutil.which(name) or shutil.which(name, path="/usr/sbin:/usr/bin")
    if path is None:
        if os.environ.get("RLHF_REQUIRE_BROWSER") == "1":
            pytest.fail(f"{name} is not installed (apt-get install {name}); RLHF_REQUIRE_BROWSER=1")
        pytest.skip(f"{name} is not installed (apt-get install {name})")
    return path


@pytest.fixture
def nginx(tmp_path):
    """nginx(app_port) -> the https URL of /label/ on a running nginx in front of that port."""
    nginx_bin, openssl = tool("nginx"), tool("openssl")
    directory = tmp_path / "nginx"
    directory.mkdir()
    subprocess.run(
        [openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=127.0.0.1",
         "-keyout", directory / "key.pem", "-out", directory / "cert.pem"],
        check=True, capture_output=True,
    )
    processes = []

    def start(app_port: int) -> str:
        port = free_port()
        (directory / "nginx.conf").write_text(NGINX_CONF.format(dir=directory, port=port, app_port=app_port))
        process = subprocess.Popen([nginx_bin, "-p", str(directory), "-c", str(directory / "nginx.conf")],
                                   stderr=subprocess.PIPE)
        processes.append(process)
        url = f"https://127.0.0.1:{port}/label"
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise RuntimeError(f"nginx exited: {process.stderr.read().decode()}")
            try:
                httpx.get(url + "/login", verify=False, timeout=1)
                return url
            except httpx.TransportError:
                time.sleep(0.1)
        raise RuntimeError("nginx did not start in 20 s")

    yield start
    for process in processes:
        process.terminate()
        process.wait(10)


def test_sign_in_and_answer_through_nginx_with_tls_and_a_root_path(browser, serve, nginx, tmp_path):
    db = make_project(tmp_path, "pair", PAIR_RECORDS)
    server = serve(db, "--root-path", "/label", "--trusted-proxy", "127.0.0.1")
    url = nginx(server.port)
    link = cli("add-labeler", "alice", "--db", str(db), "--base-url", url)
    context = browser.new_context(ignore_https_errors=True)
    page = context.new_page()
    responses = []
    page.on("response", lambda r: responses.append((r.status, r.url)))
    page.goto(link)
    press_sign_in(page)
    page.wait_for_url(f"{url}/label")
    (cookie,) = context.cookies()
    assert cookie["secure"] and cookie["path"] == "/label" and cookie["sameSite"] == "Lax"
    item = item_on(page)
    press(page, "a")
    assert page.url == f"{url}/label?done=saved" and page.inner_text(".notice") == "Answer saved."
    (answer,) = Store(db).live_answers()
    assert answer.item_id == item and answer.labeler == "alice"
    assert (200, f"{url}/static/label.js") in responses  # the script and stylesheet come through too
    assert [r for r in responses if r[0] >= 400] == []
    context.close()
