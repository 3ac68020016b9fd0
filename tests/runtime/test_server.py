"""`sparsefit serve` as a real server: a subprocess on 127.0.0.1 (any free port), a tiny random
Llama, the official `openai` client, and raw HTTP for the bad requests."""

from __future__ import annotations

import http.client
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from transformers import AutoModelForCausalLM

from sparsefit.export import export_checkpoint
from sparsefit.runtime.kernels import load_kernels
from tests.conftest import tiny_config, tiny_tokenizer

pytestmark = pytest.mark.skipif(not load_kernels().available, reason="kernels unavailable")

KEY = "test-key"
CHAT_TEMPLATE = (
    "{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<s>assistant:{% endif %}"
)
PROMPTS = ["Tom has 3 apples", "The quick brown fox", "Sparse models keep", "Answer: 3 + 5"]


class Server:
    """`python -m sparsefit.cli serve ...` on port 0; its log lines collected as they come."""

    def __init__(self, model: str, *flags: str) -> None:
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
        argv = [sys.executable, "-m", "sparsefit.cli", "serve", "--model", model, "--port", "0", *flags]
        self.proc = subprocess.Popen(argv, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, env=env)
        self.lines: list[str] = []
        started = threading.Event()
        self.port = None

        def read() -> None:
            for line in self.proc.stderr:
                self.lines.append(line)
                found = re.search(r"serving '.*' at http://127\.0\.0\.1:(\d+)/v1", line)
                if found:
                    self.port = int(found.group(1))
                    started.set()
            started.set()

        threading.Thread(target=read, daemon=True).start()
        if not started.wait(120) or self.port is None:
            self.proc.kill()
            raise AssertionError("the server did not start:\n" + "".join(self.lines[-30:]))
        self.base = f"http://127.0.0.1:{self.port}/v1"

    def request(self, method: str, path: str, body: object = None, key: str | None = KEY, raw: bytes | None = None):
        """(status, headers, parsed JSON or text) of one request."""
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
        headers = {"Content-Type": "application/json"}
        if key:
            headers["Authorization"] = f"Bearer {key}"
        data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
        conn.request(method, path, body=data, headers=headers)
        response = conn.getresponse()
        text = response.read().decode()
        conn.close()
        try:
            parsed = json.loads(text)
        except ValueError:
            parsed = text
        return response.status, dict(response.getheaders()), parsed

    def metric(self, name: str) -> float:
        _, _, text = self.request("GET", "/metrics")
        found = re.search(rf"^{re.escape(name)} (\S+)$", text, re.M)
        return float(found.group(1)) if found else 0.0

    def wait_for(self, check, seconds: float = 15.0) -> bool:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            if check():
                return True
            time.sleep(0.05)
        return False

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(30)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A tiny Llama with a long context (so a long request stays live for a while) and a chat template."""
    torch.manual_seed(0)
    config = tiny_config("llama")
    config.max_position_embeddings = 4096
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2 and "embed" not in name:
                p.normal_(0, 0.1)
    path = tmp_path_factory.mktemp("serve") / "tiny"
    tok = tiny_tokenizer()  # its own, so the session's tokenizer keeps no chat template
    tok.chat_template = CHAT_TEMPLATE
    export_checkpoint(model, tok, path, source="tiny")
    return str(path)


@pytest.fixture(scope="module")
def server(checkpoint):
    s = Server(checkpoint, "--api-key", KEY, "--max-batch", "32", "--max-model-len", "4096", "--model-name", "tiny")
    yield s
    assert s.stop() == 0


@pytest.fixture(scope="module")
def client(server):
    from openai import OpenAI

    return OpenAI(base_url=server.base, api_key=KEY, max_retries=0, timeout=60)


def _complete(client, prompt: str, tokens: int = 12, **kw) -> str:
    out = client.completions.create(model="tiny", prompt=prompt, max_tokens=tokens, temperature=0,
                                    extra_body={"ignore_eos": True}, **kw)  # fmt: skip
    return out.choices[0].text


def test_openai_client_completions_streaming_and_chat(server, client, checkpoint):
    from sparsefit.runtime.model import generate, load_runtime

    expected = generate(load_runtime(checkpoint, progress=False), [PROMPTS[0]], 12, ignore_eos=True).texts[0]
    out = client.completions.create(model="tiny", prompt=PROMPTS[0], max_tokens=12, temperature=0,
                                    extra_body={"ignore_eos": True})  # fmt: skip
    assert out.object == "text_completion" and out.id.startswith("cmpl-") and out.created > 0
    assert out.choices[0].text == expected and out.choices[0].finish_reason == "length"
    assert (out.usage.completion_tokens, out.usage.total_tokens) == (12, out.usage.prompt_tokens + 12)

    chunks = list(client.completions.create(model="tiny", prompt=PROMPTS[0], max_tokens=12, temperature=0,
                                            stream=True, extra_body={"ignore_eos": True}))  # fmt: skip
    assert "".join(c.choices[0].text for c in chunks) == expected and chunks[-1].choices[0].finish_reason == "length"

    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Tom has 3 apples"}]
    chat = client.chat.completions.create(model="tiny", messages=messages, max_tokens=10, temperature=0,
                                          extra_body={"ignore_eos": True})  # fmt: skip
    assert chat.object == "chat.completion" and chat.choices[0].message.role == "assistant"
    assert chat.usage.completion_tokens == 10
    stream = list(client.chat.completions.create(model="tiny", messages=messages, max_tokens=10, temperature=0,
                                                 stream=True, stream_options={"include_usage": True},
                                                 extra_body={"ignore_eos": True}))  # fmt: skip
    assert stream[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    assert text == chat.choices[0].message.content
    assert stream[-1].usage.completion_tokens == 10 and not stream[-1].choices

    assert [m.id for m in client.models.list().data] == ["tiny"]


def test_stream_is_server_sent_events_ending_in_done(server):
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    body = {"model": "tiny", "prompt": "Tom", "max_tokens": 4, "stream": True}
    conn.request("POST", "/v1/completions", json.dumps(body), {"Authorization": f"Bearer {KEY}"})
    response = conn.getresponse()
    events = [e for e in response.read().decode().split("\n\n") if e]
    assert response.getheader("content-type").startswith("text/event-stream")
    assert all(e.startswith("data: ") for e in events) and events[-1] == "data: [DONE]"


def test_stop_strings_end_the_text_before_them(client):
    full = _complete(client, PROMPTS[1], 16)
    stop = full[len(full) // 2 : len(full) // 2 + 2]
    assert stop.strip(), full
    out = client.completions.create(model="tiny", prompt=PROMPTS[1], max_tokens=16, temperature=0, stop=[stop],
                                    extra_body={"ignore_eos": True})  # fmt: skip
    assert out.choices[0].text == full[: full.index(stop)] and out.choices[0].finish_reason == "stop"


def test_seeded_sampling_repeats(client):
    runs = [client.completions.create(model="tiny", prompt="The", max_tokens=8, temperature=1.0, top_p=0.9, seed=7,
                                      extra_body={"ignore_eos": True}).choices[0].text for _ in range(2)]  # fmt: skip
    assert runs[0] == runs[1]


BAD = [
    ("/v1/completions", b'{"model": "tiny", "prompt": ', 400, None),  # malformed JSON
    ("/v1/completions", b"[1, 2]", 400, None),  # not an object
    ("/v1/completions", {"model": "tiny", "prompt": "x", "max_tokens": "ten"}, 400, "max_tokens"),
    ("/v1/completions", {"model": "tiny", "prompt": 7}, 400, "prompt"),
    ("/v1/completions", {"model": "tiny", "prompt": "x", "temperature": "hot"}, 400, "temperature"),
    ("/v1/completions", {"model": "tiny", "prompt": "x", "max_tokens": -5}, 400, "max_tokens"),
    ("/v1/completions", {"model": "tiny", "prompt": "x", "max_tokens": 10**12}, 400, "max_tokens"),
    ("/v1/completions", {"model": "tiny", "prompt": "x", "max_tokens": 4096}, 400, "max_tokens"),  # over the context
    ("/v1/completions", {"model": "tiny", "prompt": "x", "n": 2}, 400, "n"),
    ("/v1/completions", {"model": "tiny", "prompt": "x", "logprobs": 1}, 400, "logprobs"),
    ("/v1/completions", {"model": "tiny", "prompt": "x", "best_of": 3}, 400, "best_of"),
    ("/v1/completions", {"model": "tiny", "prompt": "x", "echo": True}, 400, "echo"),
    ("/v1/completions", {"model": "tiny", "prompt": "x", "presence_penalty": 0.5}, 400, "presence_penalty"),
    ("/v1/completions", {"model": "tiny", "prompt": "x", "top_p": 0}, 400, "top_p"),
    ("/v1/completions", {"model": "tiny", "prompt": "x", "stop": [""]}, 400, "stop"),
    ("/v1/completions", {"model": "tiny", "prompt": "x", "frobnicate": 1}, 400, "frobnicate"),
    ("/v1/completions", {"model": "tiny", "prompt": [1, 99999]}, 400, "prompt"),  # token id out of the vocabulary
    ("/v1/completions", {"model": "tiny", "prompt": "one two " * 2100}, 400, "prompt"),  # over the context
    ("/v1/completions", {"model": "tiny"}, 400, "prompt"),
    ("/v1/completions", {"prompt": "x"}, 400, "model"),
    ("/v1/completions", {"model": "gpt-4", "prompt": "x"}, 404, "model"),
    ("/v1/chat/completions", {"model": "tiny"}, 400, "messages"),
    ("/v1/chat/completions", {"model": "tiny", "messages": []}, 400, "messages"),
    ("/v1/chat/completions", {"model": "tiny", "messages": "hi"}, 400, "messages"),
    (
        "/v1/chat/completions",
        {"model": "tiny", "messages": [{"role": "robot", "content": "x"}]},
        400,
        "messages.0.role",
    ),  # fmt: skip
    ("/v1/chat/completions", {"model": "tiny", "messages": [{"role": "user", "content": "x"}], "n": 3}, 400, "n"),
    (
        "/v1/chat/completions",
        {"model": "tiny", "messages": [{"role": "user", "content": "x"}], "logprobs": True},
        400,
        "logprobs",
    ),  # fmt: skip
    (
        "/v1/chat/completions",
        {"model": "tiny", "messages": [{"role": "user", "content": "x"}], "tools": [{}]},
        400,
        "tools",
    ),  # fmt: skip
    ("/v1/nowhere", {}, 404, None),
]


@pytest.mark.parametrize("path, body, status, param", BAD)
def test_a_bad_request_is_a_4xx_with_an_openai_error_and_the_server_goes_on(server, path, body, status, param):
    raw = body if isinstance(body, bytes) else None
    code, _, reply = server.request("POST", path, None if raw else body, raw=raw)
    assert code == status, reply
    error = reply["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"] and error["param"] == param
    if param and code == 400:
        assert param.split(".")[0] in error["message"]
    assert server.request("GET", "/health")[0] == 200
    # one log line, read from the server's output by another thread: wait for it to arrive
    assert server.wait_for(lambda: any(f"{status} POST {path}" in line for line in server.lines[-5:]), 5.0)


def test_too_long_prompt_names_the_context(server):
    _, _, reply = server.request("POST", "/v1/completions", {"model": "tiny", "prompt": "one two " * 2100})
    assert reply["error"]["code"] == "context_length_exceeded" and "4096" in reply["error"]["message"]


def test_the_api_key_is_required_on_v1_only(server):
    for key in (None, "wrong"):
        code, _, reply = server.request("POST", "/v1/completions", {"model": "tiny", "prompt": "x"}, key=key)
        assert code == 401 and reply["error"]["code"] == "invalid_api_key"
        assert server.request("GET", "/v1/models", key=key)[0] == 401
    assert server.request("GET", "/health", key=None)[0] == 200
    assert server.request("GET", "/v1/models")[0] == 200


def test_greedy_is_the_same_alone_and_among_24_concurrent_requests(client):
    alone = {p: _complete(client, p, 16) for p in PROMPTS}
    batch = [PROMPTS[i % len(PROMPTS)] for i in range(24)]
    with ThreadPoolExecutor(24) as pool:
        together = list(pool.map(lambda p: _complete(client, p, 16), batch))
    assert together == [alone[p] for p in batch]


def test_bounded_load_every_request_answered_correctly(server, client):
    expected = {p: _complete(client, p, 8) for p in PROMPTS}

    def one(i: int) -> bool:
        prompt = PROMPTS[i % len(PROMPTS)]
        if i % 2:
            chunks = client.completions.create(model="tiny", prompt=prompt, max_tokens=8, temperature=0, stream=True,
                                               extra_body={"ignore_eos": True})  # fmt: skip
            return "".join(c.choices[0].text for c in chunks) == expected[prompt]
        return _complete(client, prompt, 8) == expected[prompt]

    failed_before = server.metric('sparsefit_requests_finished_total{reason="error"}')
    start = time.monotonic()
    with ThreadPoolExecutor(16) as pool:
        results = list(pool.map(one, range(64)))
    assert all(results) and time.monotonic() - start < 60
    assert server.metric('sparsefit_requests_finished_total{reason="error"}') == failed_before


def _open_stream(server, body: dict) -> http.client.HTTPConnection:
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    conn.request("POST", "/v1/completions", json.dumps(body), {"Authorization": f"Bearer {KEY}"})
    return conn


def test_a_client_that_disconnects_frees_its_slot(server):
    cancelled = 'sparsefit_requests_finished_total{reason="cancelled"}'
    before = server.metric(cancelled)
    long = {"model": "tiny", "prompt": "Tom", "max_tokens": 4000, "ignore_eos": True, "temperature": 0}
    conn = _open_stream(server, {**long, "stream": True})
    response = conn.getresponse()
    assert response.status == 200 and response.read(6) == b"data: "
    conn.sock.shutdown(2)
    conn.close()
    assert server.wait_for(lambda: server.metric(cancelled) == before + 1)
    assert server.wait_for(lambda: server.request("GET", "/health")[2]["running"] == 0)
    conn = _open_stream(server, long)  # not streaming: the client leaves while it waits
    assert server.wait_for(lambda: server.request("GET", "/health")[2]["running"] == 1)
    conn.sock.shutdown(2)
    conn.close()
    assert server.wait_for(lambda: server.metric(cancelled) == before + 2)
    assert server.wait_for(lambda: server.request("GET", "/health")[2]["running"] == 0)


def test_a_full_queue_answers_429_and_sigterm_exits_0(checkpoint):
    s = Server(checkpoint, "--max-batch", "1", "--max-queue", "1", "--max-model-len", "4096",
               "--shutdown-timeout", "1")  # fmt: skip
    try:
        long = {"model": checkpoint, "prompt": "Tom", "max_tokens": 4000, "ignore_eos": True, "stream": True}
        first = _open_stream(s, long)
        assert first.getresponse().status == 200
        second = _open_stream(s, long)
        assert s.wait_for(lambda: s.request("GET", "/health")[2]["waiting"] == 1)
        code, headers, reply = s.request("POST", "/v1/completions", {**long, "stream": False})
        assert code == 429 and headers["retry-after"] == "1" and reply["error"]["code"] == "queue_full"
        start = time.monotonic()
        assert s.stop() == 0 and time.monotonic() - start < 10
        assert any("Shutting down" in line for line in s.lines)
        first.close(), second.close()
    finally:
        s.proc.kill()


@pytest.mark.parametrize(
    "flags, says",
    [
        (["--port", "70000"], "--port"),
        (["--max-batch", "0"], "--max-batch"),
        (["--shutdown-timeout", "-1"], "--shutdown-timeout"),
        (["--runtime", "gpu"], "--runtime"),
        (["--host", "no-such-host.invalid"], "--host"),
        (["--port", "{busy}"], "--port"),
        (["--max-model-len", "100000"], "--max-model-len"),
    ],
)
def test_bad_serve_flags_end_in_one_error_line_and_exit_2(checkpoint, flags, says):
    with socket.create_server(("127.0.0.1", 0)) as busy:
        flags = [f.format(busy=busy.getsockname()[1]) for f in flags]
        argv = [sys.executable, "-m", "sparsefit.cli", "serve", "--model", checkpoint, *flags]
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        done = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=120)
    errors = [line for line in done.stderr.splitlines() if line.startswith("sparsefit: error:")]
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr and len(errors) == 1 and says in errors[0], done.stderr
