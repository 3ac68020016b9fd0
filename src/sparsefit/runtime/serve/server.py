"""Running the server: the socket, the model and its KV cache, uvicorn (see the package's docstring)."""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import signal
import socket
import threading

import uvicorn

from sparsefit.errors import SparsefitError, UsageError
from sparsefit.runtime.config import DEFAULT_MAX_MODEL_LEN, ServeOptions

log = logging.getLogger("sparsefit.serve")


def bind(host: str, port: int) -> socket.socket:
    """A listening TCP socket, or a one-line UsageError."""
    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
        return socket.create_server((host, port), family=family, backlog=2048)
    except socket.gaierror as err:
        raise UsageError(
            f"--host '{host}' does not resolve ({err.strerror}); pass an address such as 127.0.0.1"
        ) from None
    except OSError as err:
        raise UsageError(
            f"cannot listen on {host}:{port} ({err.strerror}); pass another --port (0: any free one)"
        ) from None


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def _available_memory() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    return None


def kv_cache_bytes(shape: object, slots: int, capacity: int) -> int:
    """Bytes of `runtime.decoder.KVCache`: keys and values of every layer, float32."""
    return 2 * shape.layers * slots * shape.kv_heads * capacity * shape.head_dim * 4


def build_server(spec: str, options: ServeOptions, sock: socket.socket) -> object:
    """The FastAPI app serving `spec` (loaded here) on `sock`."""
    import torch

    from sparsefit.runtime.engine import Engine
    from sparsefit.runtime.kernels import load_kernels
    from sparsefit.runtime.model import load_runtime
    from sparsefit.runtime.serve.app import create_app

    if options.threads:
        torch.set_num_threads(options.threads)
    runtime = options.runtime
    if runtime == "auto":
        runtime = "sparse" if load_kernels().available else "dense"
    model = load_runtime(spec, runtime, options.values, None if options.isa == "auto" else options.isa)
    context = model.context
    capacity = options.max_model_len or min(context, DEFAULT_MAX_MODEL_LEN)
    if capacity > context:
        raise UsageError(f"--max-model-len {capacity} exceeds the model's context of {context} tokens; pass at most "
                         f"{context}")  # fmt: skip
    need = kv_cache_bytes(model.decoder.shape, options.max_batch, capacity)
    free = _available_memory()
    if free is not None and need > 0.8 * free:
        raise UsageError(
            f"the KV cache of --max-batch {options.max_batch} x --max-model-len {capacity} tokens needs "
            f"{need / 2**30:.1f} GiB, more than the {free / 2**30:.1f} GiB free; lower one of them"
        )
    engine = Engine(model.decoder, model.tokenizer, options.max_batch, capacity, model.eos, options.prefill_chunk)
    name = options.model_name or spec
    host, port = sock.getsockname()[:2]
    url = f"http://{'[' + host + ']' if ':' in host else host}:{port}"
    banner = (f"serving '{name}' at {url}/v1 ({model.runtime}, {model.kernel}, {model.values}; "
              f"{options.max_batch} slots x {capacity} tokens, KV cache {need / 2**20:.0f} MiB; "
              f"{torch.get_num_threads()} threads)")  # fmt: skip
    app = create_app(model, engine, name, options.api_key, options.max_queue, options.shutdown_timeout, banner)
    return app


def run_server(spec: str, options: ServeOptions) -> None:
    sock = bind(options.host, options.port)
    try:
        if not _is_loopback(options.host) and not options.api_key:
            log.warning("listening on %s without --api-key: anyone who can reach it may use it", options.host)
        app = build_server(spec, options, sock)
        config = uvicorn.Config(app, log_config=None, access_log=False, lifespan="on",
                                timeout_graceful_shutdown=options.shutdown_timeout)  # fmt: skip
        server = _Server(config)
        scheduler = app.state.scheduler

        def serve_http() -> None:
            try:
                server.run(sockets=[sock])
            finally:  # however uvicorn ended, the decode loop ends with it
                scheduler.stop(0)

        # The decode loop keeps this (the model's) thread, uvicorn's event loop takes another (see
        # scheduler.py for why); signals arrive here and ask uvicorn for its graceful shutdown.
        http = threading.Thread(target=serve_http, name="sparsefit-http")
        previous = {s: signal.signal(s, server.handle_exit) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            http.start()
            scheduler.run()
            http.join()
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)
        if not server.started:  # uvicorn gave up before serving (its reason is in the log above)
            raise SparsefitError("the HTTP server did not start; see the log lines above")
    finally:
        sock.close()


class _Server(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self):
        """No signal handlers of uvicorn's own: it runs outside the main thread, where `run_server`
        routes SIGINT and SIGTERM to `handle_exit` (a graceful shutdown; a second Ctrl-C forces it)
        and does not raise them again afterwards: a server asked to stop has done its job, exit 0."""
        yield
