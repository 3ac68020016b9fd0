"""`sparsefit serve` under load: requests/s, tokens/s, time to first token and inter-token latency.

For each model (the builtin dense model and its 50% / 70% magnitude-pruned copies, pruned once into
--work-dir), a real server on 127.0.0.1 gets, at each concurrency, a fixed number of streaming
completions (greedy, `ignore_eos`, --max-tokens each) from as many client threads. Client-side
times per request: first token (TTFT) and between text chunks (ITL; a chunk is one token unless
the text is held back, e.g. mid-character). Aggregate decode tokens/s at the
highest concurrency is compared with one stream (the issue's targets: >= 2x dense, >= 4x at 70%,
p99 ITL <= 3x one stream's). With --llama-server and --gguf, the same load runs against
llama.cpp's `llama-server` (its OpenAI endpoint) for reference (that path is untested here: no
llama-server was built). Run it alone on the machine:

    SPARSEFIT_DATA_DIR=../shared/data python benchmarks/serve.py
    python benchmarks/serve.py --quick --models tiny=/path/to/checkpoint --out /tmp/serve.json
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import re
import statistics
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from environment import ROOT, environment
from sparsefit.atomic import write_json

PROMPT = "Question: Tom has 3 apples and buys 5 more. How many apples does he have? Explain step by step."


def _percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    values = sorted(values)
    return values[min(len(values) - 1, round(q * (len(values) - 1)))]


class Endpoint:
    """A server process (ours or llama-server) and the model id it answers to."""

    def __init__(self, argv: list[str], ready: str, model: str, port: int | None = None) -> None:
        env = {**os.environ, "PYTHONPATH": str(ROOT / "src") + os.pathsep + os.environ.get("PYTHONPATH", "")}
        self.proc = subprocess.Popen(argv, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, env=env)
        self.model, self.port, self.lines = model, port, []
        started = threading.Event()

        def read() -> None:
            for line in self.proc.stderr:
                self.lines.append(line)
                found = re.search(ready, line)
                if found:
                    self.port = self.port or int(found.group(1))
                    started.set()
            started.set()

        threading.Thread(target=read, daemon=True).start()
        if not started.wait(900) or self.proc.poll() is not None:
            self.proc.kill()
            raise SystemExit("the server did not start:\n" + "".join(self.lines[-20:]))
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:  # llama-server logs before it answers
            try:
                conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=5)
                conn.request("GET", "/health")
                if conn.getresponse().status == 200:
                    return
            except OSError:
                pass
            time.sleep(0.5)
        raise SystemExit("the server does not answer /health")

    def stream(self, max_tokens: int) -> dict:
        """One streaming completion, timed at the client."""
        body = {"model": self.model, "prompt": PROMPT, "max_tokens": max_tokens, "temperature": 0, "stream": True,
                "ignore_eos": True}  # fmt: skip
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=600)
        start = time.perf_counter()
        conn.request("POST", "/v1/completions", json.dumps(body), {"Content-Type": "application/json"})
        response = conn.getresponse()
        if response.status != 200:
            return {"ok": False, "status": response.status}
        times, tokens = [], 0
        for line in response:
            if not line.startswith(b"data: ") or line.strip() == b"data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("choices") and chunk["choices"][0].get("text"):
                times.append(time.perf_counter())
            tokens += 1
        conn.close()
        end = time.perf_counter()
        return {"ok": bool(times), "ttft": times[0] - start if times else None, "gaps": [b - a for a, b in
                zip(times, times[1:])], "chunks": tokens, "seconds": end - start, "first": times[0] if times else end,
                "end": end}  # fmt: skip

    def stop(self) -> int:
        self.proc.terminate()
        return self.proc.wait(60)


def load(endpoint: Endpoint, concurrency: int, requests: int, max_tokens: int) -> dict:
    start = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        runs = list(pool.map(lambda _: endpoint.stream(max_tokens), range(requests)))
    seconds = time.perf_counter() - start
    ok = [r for r in runs if r["ok"]]
    gaps = [g for r in ok for g in r["gaps"]]
    tokens = requests * max_tokens if len(ok) == requests else sum(len(r["gaps"]) + 1 for r in ok)
    # decode tokens/s: the tokens after each request's first, over the span from the first first-token on
    decode_span = max(r["end"] for r in ok) - min(r["first"] for r in ok) if ok else 0.0
    decode_tokens = sum(len(r["gaps"]) for r in ok)
    return {
        "concurrency": concurrency,
        "requests": requests,
        "failed": requests - len(ok),
        "seconds": seconds,
        "requests_per_s": len(ok) / seconds,
        "tokens_per_s": tokens / seconds,
        "decode_tokens_per_s": decode_tokens / decode_span if decode_span else None,
        "ttft_p50": _percentile([r["ttft"] for r in ok], 0.5),
        "ttft_p99": _percentile([r["ttft"] for r in ok], 0.99),
        "itl_p50": _percentile(gaps, 0.5),
        "itl_p99": _percentile(gaps, 0.99),
        "itl_mean": statistics.fmean(gaps) if gaps else None,
    }


def pruned(work: Path, sparsity: float) -> str:
    """The builtin model magnitude-pruned to `sparsity`, made once (speed needs the zeros, not the best recipe)."""
    out = work / f"smollm2-135m-magnitude{round(sparsity * 100)}"
    if not (out / "config.json").exists():
        subprocess.run([sys.executable, "-m", "sparsefit.cli", "prune", "--model", "smollm2-135m",
                        "--method", "magnitude", "--sparsity", str(sparsity), "--output", str(out), "--overwrite"],
                       check=True,
                       env={**os.environ, "PYTHONPATH": str(ROOT / "src")})  # fmt: skip
    return str(out)


def run_model(label: str, endpoint: Endpoint, args: argparse.Namespace) -> dict:
    endpoint.stream(4)  # warm up
    levels = []
    for c in args.concurrency:
        result = load(endpoint, c, max(args.requests_per_level, c * args.rounds), args.max_tokens)
        print(label, json.dumps(result), flush=True)
        levels.append(result)
    one, top = levels[0], levels[-1]
    summary = {"levels": levels}
    if one["concurrency"] == 1 and one["decode_tokens_per_s"] and top["decode_tokens_per_s"]:
        summary["decode_speedup_top_vs_1"] = top["decode_tokens_per_s"] / one["decode_tokens_per_s"]
        summary["itl_p99_top_vs_1"] = top["itl_p99"] / one["itl_p99"] if one["itl_p99"] else None
    return summary


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=None,
                   help="LABEL=SPEC (default: dense=smollm2-135m, its 50%%/70%% magnitude-pruned copies)")  # fmt: skip
    p.add_argument("--work-dir", default=None, help="where pruned copies are kept (default: ../serve-bench-models)")
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16, 24])
    p.add_argument("--rounds", type=int, default=2, help="requests per client thread at each concurrency")
    p.add_argument("--requests-per-level", type=int, default=8)
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--threads", type=int, default=None, help="server CPU threads (default: one per core)")
    p.add_argument("--llama-server", default=None, help="llama.cpp's llama-server binary, for reference")
    p.add_argument("--gguf", default=None, help="the GGUF file llama-server loads")
    p.add_argument("--quick", action="store_true", help="a smoke run: concurrency 1 and 4, 8 tokens")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "serve.json"))
    args = p.parse_args()
    if args.quick:
        args.concurrency, args.max_tokens, args.rounds, args.requests_per_level = [1, 4], 8, 1, 4
    if args.models:
        models = dict(m.split("=", 1) for m in args.models)
    else:
        work = Path(args.work_dir) if args.work_dir else ROOT.parent / "serve-bench-models"
        work.mkdir(parents=True, exist_ok=True)
        models = {"dense": "smollm2-135m", "sparse50": pruned(work, 0.5), "sparse70": pruned(work, 0.7)}

    slots = max(args.concurrency)
    context = len(PROMPT) + args.max_tokens + 64  # characters bound tokens from above
    result: dict = {"benchmark": "serve", "environment": environment(), "args": vars(args), "models": {}}
    for label, spec in models.items():
        argv = [sys.executable, "-m", "sparsefit.cli", "serve", "--model", spec, "--port", "0", "--model-name", label,
                "--max-batch", str(slots), "--max-model-len", str(context), "--max-queue", str(4 * slots)]  # fmt: skip
        if args.threads:
            argv += ["--threads", str(args.threads)]
        endpoint = Endpoint(argv, r"serving '.*' at http://127\.0\.0\.1:(\d+)/v1", label)
        try:
            result["models"][label] = {"spec": spec, "banner": next(x for x in endpoint.lines if "serving" in x)
                                       .split("INFO ", 1)[-1].strip(), **run_model(label, endpoint, args)}  # fmt: skip
        finally:
            result["models"][label]["exit_code"] = endpoint.stop()
    if args.llama_server and args.gguf:
        port = 18000 + os.getpid() % 1000
        argv = [args.llama_server, "-m", args.gguf, "--host", "127.0.0.1", "--port", str(port), "-np", str(slots),
                "-c", str(context * slots), "-t", str(args.threads or os.cpu_count())]  # fmt: skip
        endpoint = Endpoint(argv, r"(?:listening|server is listening)", "gguf", port=port)
        try:
            result["llama_server"] = {"gguf": args.gguf, **run_model("llama-server", endpoint, args)}
        finally:
            endpoint.stop()
    else:
        result["llama_server"] = "not run (pass --llama-server and --gguf)"
    write_json(args.out, result)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
