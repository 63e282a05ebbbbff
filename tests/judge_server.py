"""A small OpenAI-compatible chat endpoint on 127.0.0.1 for the judge's client tests, with faults on demand.

Its judge prefers the shorter response (pair), rates by length (rate) and ranks shortest first,
so that every label it gives can be checked by hand. `plan` is a list of behaviours consumed one
per request ("ok", "logprobs", "429", "500", "garbage", "slow", "unsure", "cut": finish_reason
"length"); when it runs out,
`default` applies. Every request body is kept in `requests`.
"""

from __future__ import annotations

import json
import math
import re
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


def responses_of(text: str) -> list[str]:
    return re.findall(r"Response [A-Z]:\n(.*?)(?:\n\n|$)", text, re.S)


def verdict(text: str) -> str:
    """The answer this judge gives to a judge question: the letter of the shorter response, the
    letters shortest first, or a digit (7 for the shortest)."""
    found = responses_of(text)
    if "Response A:" in text and "Response B:" in text and "Order the responses" not in text:
        return "A" if len(found[0]) <= len(found[1]) else "B"
    if "Order the responses" in text:
        return " > ".join("ABCDEFGH"[i] for i in sorted(range(len(found)), key=lambda i: (len(found[i]), i)))
    response = re.search(r"Response:\n(.*?)\n\n", text, re.S).group(1)
    return str(max(1, 7 - len(response) // 20))


class Endpoint:
    def __init__(self, default: str = "ok"):
        self.plan: list[str] = []
        self.default = default
        self.requests: list[dict] = []
        self.lock = threading.Lock()
        endpoint = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with endpoint.lock:
                    endpoint.requests.append(body)
                    mode = endpoint.plan.pop(0) if endpoint.plan else endpoint.default
                if mode == "slow":
                    time.sleep(2.0)
                if mode == "429":
                    return self.reply(429, b'{"error": "rate limit"}', {"Retry-After": "0"})
                if mode == "500":
                    return self.reply(500, b'{"error": "overloaded"}')
                if mode == "garbage":
                    return self.reply(200, b"<html>upstream proxy error</html>")
                answer = verdict(body["messages"][-1]["content"])
                message = {"role": "assistant", "content": "I cannot tell." if mode == "unsure" else answer}
                choice = {"index": 0, "message": message, "finish_reason": "length" if mode == "cut" else "stop"}
                if mode == "logprobs" and body.get("logprobs"):
                    # The chosen letter at 0.8 and the other at 0.15: the rest is elsewhere in the vocabulary.
                    other = "B" if answer == "A" else "A"
                    top = [{"token": f" {answer}", "logprob": math.log(0.8)}, {"token": other, "logprob": math.log(0.15)}]
                    choice["logprobs"] = {"content": [{"token": f" {answer}", "logprob": math.log(0.8), "top_logprobs": top}]}
                self.reply(200, json.dumps({"id": "x", "object": "chat.completion", "choices": [choice]}).encode())

            def reply(self, status: int, data: bytes, headers: dict | None = None):
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(data)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()
