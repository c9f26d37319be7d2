#!/usr/bin/env python3
"""Client compatibility: the official OpenAI Python SDK through the real Meridian binary.

Starts a fake model server on loopback (the response head at once, tokens later, whole
answers with usage, GET /v1/models), runs `meridian run` in front of it, and checks with the
SDK that:
  - a streamed chat completion arrives token by token and whole;
  - a non-streamed completion reports its usage;
  - a residency refusal reads as e.code == "residency_unavailable";
  - a missing model reads as e.code == "model_not_found";
  - a stream the model server drops mid-way raises APIError with Meridian's code.

Usage: openai_client.py [path/to/meridian]   (default: $MERIDIAN_BIN or target/debug/meridian)
Exit status 0 when every check passes.
"""

import json
import os
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import openai

TOKENS = ["Hello", " from", " a", " fake", " model", "."]
MODEL = "llama-3.1-70b"
US = "8.8.8.8"
DE = "5.9.0.1"


class FakeModel(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def _send(self, status, body, content_type="application/json"):
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        self.send_response(status)
        self.send_header("content-type", content_type)
        self.send_header("content-length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self):
        if self.path == "/health":
            self._send(200, b"ok", "text/plain")
        elif self.path == "/v1/models":
            self._send(200, {"object": "list", "data": [{"id": MODEL, "object": "model", "owned_by": "fake"}]})
        else:
            self._send(404, {"error": {"message": "not found", "type": "invalid_request_error", "code": None}})

    def do_POST(self):
        length = int(self.headers.get("content-length", "0"))
        request = json.loads(self.rfile.read(length) or b"{}")
        created = int(time.time())
        if request.get("stream"):
            # The head at once, as uvicorn writes it; tokens after a short prefill.
            self.send_response(200)
            self.send_header("content-type", "text/event-stream")
            self.send_header("transfer-encoding", "chunked")
            self.end_headers()

            def event(payload):
                data = ("data: " + (payload if isinstance(payload, str) else json.dumps(payload)) + "\n\n").encode()
                self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
                self.wfile.flush()

            time.sleep(0.05)
            if request.get("messages", [{}])[-1].get("content") == "cut":
                # Two tokens, then the connection drops without the final chunk: a crashed worker.
                for token in TOKENS[:2]:
                    event({"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": created,
                           "model": request.get("model"),
                           "choices": [{"index": 0, "delta": {"content": token}, "finish_reason": None}]})
                self.close_connection = True
                return
            for i, token in enumerate(TOKENS):
                delta = {"content": token} if i else {"role": "assistant", "content": token}
                event({"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": created,
                       "model": request.get("model"), "choices": [{"index": 0, "delta": delta, "finish_reason": None}]})
                time.sleep(0.01)
            event({"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": created,
                   "model": request.get("model"), "choices": [],
                   "usage": {"prompt_tokens": 9, "completion_tokens": len(TOKENS), "total_tokens": 9 + len(TOKENS)}})
            event("[DONE]")
            self.wfile.write(b"0\r\n\r\n")
            self.wfile.flush()
            return
        time.sleep(0.05)
        self._send(200, {
            "id": "chatcmpl-2", "object": "chat.completion", "created": created, "model": request.get("model"),
            "choices": [{"index": 0, "message": {"role": "assistant", "content": "".join(TOKENS)}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 9, "completion_tokens": len(TOKENS), "total_tokens": 9 + len(TOKENS)},
        })


def start_meridian(binary, config):
    proc = subprocess.Popen([binary, "run", "-c", config], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            env={**os.environ, "RUST_LOG": "info"}, text=True)
    deadline = time.time() + 20
    while time.time() < deadline:
        line = proc.stderr.readline()
        if not line:
            break
        if "meridian serving" in line:
            v = json.loads(line)
            # Keep draining the log so the process never blocks on a full pipe.
            threading.Thread(target=lambda: [None for _ in proc.stderr], daemon=True).start()
            return proc, v["listen"], v["admin"]
    proc.kill()
    sys.exit("meridian did not start")


def wait_ready(admin):
    deadline = time.time() + 20
    while time.time() < deadline:
        try:
            if urllib.request.urlopen(f"http://{admin}/readyz", timeout=2).status == 200:
                return
        except Exception:
            pass
        time.sleep(0.1)
    sys.exit("meridian never became ready")


def main():
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    binary = sys.argv[1] if len(sys.argv) > 1 else os.environ.get("MERIDIAN_BIN", os.path.join(root, "target/debug/meridian"))
    server = ThreadingHTTPServer(("127.0.0.1", 0), FakeModel)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    model_url = f"http://127.0.0.1:{server.server_address[1]}"

    # A closed port: the eu zone's only region never answers, so its clients are refused.
    import socket
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    dead_url = f"http://127.0.0.1:{s.getsockname()[1]}"

    with tempfile.TemporaryDirectory() as tmp:
        config = os.path.join(tmp, "meridian.toml")
        with open(config, "w") as f:
            f.write(f"""
[server]
listen = "127.0.0.1:0"
[admin]
listen = "127.0.0.1:0"
[log]
format = "json"
[geoip]
default_region = "us-east"
[health]
interval = "100ms"
timeout = "500ms"
unhealthy_after = 1
[[region]]
name = "us-east"
location = [39.04, -77.49]
countries = ["US"]
endpoints = ["{model_url}"]
models = ["{MODEL}"]
[[region]]
name = "eu-central"
location = [50.11, 8.68]
countries = ["DE"]
endpoints = ["{dead_url}"]
models = ["{MODEL}"]
[[residency]]
name = "eu"
countries = ["DE"]
regions = ["eu-central"]
""")
        proc, listen, admin = start_meridian(binary, config)
        try:
            wait_ready(admin)
            return run_checks(listen)
        finally:
            proc.terminate()
            proc.wait(timeout=10)
            s.close()


def client(listen, ip):
    return openai.OpenAI(base_url=f"http://{listen}/v1", api_key="unused", max_retries=0, timeout=10,
                         default_headers={"x-forwarded-for": ip})


def run_checks(listen):
    failures = []

    def check(name, fn):
        try:
            fn()
            print(f"PASS {name}")
        except Exception as e:  # every check reports, then the exit status tells
            print(f"FAIL {name}: {type(e).__name__}: {e}")
            failures.append(name)

    def streamed():
        stream = client(listen, US).chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "hi"}], stream=True,
            stream_options={"include_usage": True})
        pieces, usage = [], None
        for chunk in stream:
            pieces.extend(c.delta.content or "" for c in chunk.choices)
            usage = chunk.usage or usage
        assert "".join(pieces) == "".join(TOKENS), pieces
        assert usage is not None and usage.completion_tokens == len(TOKENS), usage

    def whole():
        r = client(listen, US).chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}])
        assert r.choices[0].message.content == "".join(TOKENS)
        assert r.usage.completion_tokens == len(TOKENS)

    def residency():
        try:
            client(listen, DE).chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}])
        except openai.APIStatusError as e:
            assert e.status_code == 503, e.status_code
            assert e.code == "residency_unavailable", f"e.code = {e.code!r}, body = {e.body!r}"
            return
        raise AssertionError("a DE client was served outside its zone")

    def missing_model():
        try:
            client(listen, US).chat.completions.create(model="no-such-model", messages=[{"role": "user", "content": "hi"}])
        except openai.NotFoundError as e:
            assert e.code == "model_not_found", f"e.code = {e.code!r}, body = {e.body!r}"
            assert "no-such-model" in str(e), str(e)
            return
        raise AssertionError("a missing model was served")

    def cut_stream():
        stream = client(listen, US).chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "cut"}], stream=True)
        pieces = []
        try:
            for chunk in stream:
                pieces.extend(c.delta.content or "" for c in chunk.choices)
        except openai.APIError as e:
            assert e.code == "upstream_unreachable", f"e.code = {e.code!r}, body = {e.body!r}"
            assert "broke off" in e.message, e.message
            assert "".join(pieces) == "".join(TOKENS[:2]), pieces
            return
        raise AssertionError(f"a cut stream read as complete: {pieces}")

    check("streamed chat completion through Meridian", streamed)
    check("a stream cut mid-way raises APIError with Meridian's code", cut_stream)
    check("whole chat completion with usage", whole)
    check("residency refusal reads as e.code == 'residency_unavailable'", residency)
    check("missing model reads as e.code == 'model_not_found'", missing_model)
    print(f"openai {openai.__version__}: {5 - len(failures)} of 5 checks passed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
