"""``fluxtrt serve``: listen at once, load and warm up on the worker thread, answer until SIGTERM or Ctrl-C, then stop
taking requests, finish those taken, and return (the process exits 0)."""

from __future__ import annotations

import signal
import socket
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from fluxtrt.errors import InputError, MissingDependencyError
from fluxtrt.serve.options import ServeConfig
from fluxtrt.serve.worker import EditWorker

# The serve extra: module name -> package name.
SERVE_PACKAGES = {"fastapi": "fastapi", "uvicorn": "uvicorn", "prometheus_client": "prometheus-client",
                  "multipart": "python-multipart"}  # fmt: skip

# Seconds the server waits for requests it took to be answered after SIGTERM before it closes their connections.
GRACEFUL_SHUTDOWN_S = 600


def require_serve_extra() -> None:
    """Raise MissingDependencyError naming the first package of the serve extra that is not installed."""
    import importlib.util

    for module, package in SERVE_PACKAGES.items():
        if importlib.util.find_spec(module) is None:
            raise MissingDependencyError(package, "fluxtrt serve", "pip install 'fluxtrt[serve]'")


def make_worker(config: ServeConfig, metrics: Any, on_line: Callable[[str], None] = lambda line: None,
                loader: Callable[[], Any] | None = None,
                on_fatal: Callable[[BaseException], None] | None = None) -> EditWorker:  # fmt: skip
    """The worker of ``config``: the LoRAs are read now (a bad file raises here, before anything listens); on its
    thread it loads (``loader``, else ``config.source``), checks the LoRAs against the transformer and warms up.

    Args:
        config: the server's options.
        metrics: where batches and queue depth are counted.
        on_line: called with a line for the log when the model is ready or failed.
        loader: returns a ``fluxtrt.serve.load.Loaded``; None loads ``config.source``.
        on_fatal: called, instead of logging, with the error of a LoRA that does not fit the loaded transformer
            (the server should then stop); None: logged as a failed load.

    Raises:
        InputError: a LoRA that cannot be read (not safetensors, no LoRA, text-encoder updates).
    """
    from fluxtrt.serve.load import load, warm_up
    from fluxtrt.serve.loras import LoraSwitch, read_served

    loras = read_served(config.loras) if config.loras else {}

    def start() -> Any:
        t0 = time.perf_counter()
        loaded = None
        try:
            loaded = loader() if loader is not None else load(config.source, config.max_batch)
            if loras:
                loaded.loras = LoraSwitch(loaded.pipeline, loras)
            warm_up(loaded, config.sampler, config.warmup_size, config.warmup_steps, config.keep_reference_size)
        except BaseException as exc:
            if on_fatal is not None and loaded is not None and loras and loaded.loras is None:
                on_fatal(exc)
            else:
                on_line(f"error: loading failed: {exc}")
            raise
        served = f"; LoRAs {', '.join(loras)}" if loras else ""
        on_line(f"ready: {loaded.label} on {loaded.device}, batch up to {loaded.max_batch}{served}; loaded in "
                f"{loaded.load_s:.1f} s, warmed up in {loaded.warmup_s:.1f} s ({time.perf_counter() - t0:.1f} s "
                "in all)")  # fmt: skip
        return loaded

    worker = EditWorker(start, config.sampler, config.max_queue, config.keep_reference_size,
                        on_batch=metrics.on_batch, on_depth=metrics.queue_depth.set,
                        on_busy=metrics.running.set)  # fmt: skip
    worker.loras = loras
    metrics.name_loras(loras)
    return worker


def bind(host: str, port: int) -> socket.socket:
    """A listening socket on ``host``:``port`` (0: a free port), bound before the model loads so that the address
    is known, and taken, at once.

    Raises:
        InputError: the address cannot be bound (in use, not this machine's).
    """
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        sock = socket.socket(family, kind, proto)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(128)
    except OSError as exc:
        raise InputError(f"--host {host} --port {port} cannot be listened on ({exc.strerror or exc}): pick a free "
                         "port, or an address of this machine") from None  # fmt: skip
    sock.set_inheritable(True)
    return sock


@contextmanager
def quiet_exit_signals() -> Iterator[None]:
    """SIGTERM and SIGINT handled by the server's graceful shutdown, and not raised again once it is done (uvicorn
    re-raises the signal to the handler it found, which is then this no-op): the process exits 0."""
    handled = (signal.SIGTERM, signal.SIGINT)
    previous = {sig: signal.signal(sig, lambda *_: None) for sig in handled}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def serve(config: ServeConfig, on_line: Callable[[str], None]) -> None:
    """Serve until SIGTERM or SIGINT.

    Args:
        config: the server's options.
        on_line: where log lines go (the address, ready, failures).

    Raises:
        InputError: the address cannot be bound, the API key variable is unset, or a LoRA cannot be read (before
            anything listens) or does not fit the loaded transformer (the server then stops before serving an edit).
    """
    require_serve_extra()
    import uvicorn

    from fluxtrt.serve.app import create_app
    from fluxtrt.serve.metrics import Metrics

    metrics = Metrics()
    fatal: list[BaseException] = []
    server: Any = None

    def stop_for(exc: BaseException) -> None:  # a LoRA that does not fit: nothing to serve
        fatal.append(exc)
        server.should_exit = True

    worker = make_worker(config, metrics, on_line, on_fatal=stop_for)
    app = create_app(config, worker, metrics)
    sock = bind(config.host, config.port)
    host, port = sock.getsockname()[:2]
    shown = f"[{host}]" if ":" in host else host
    on_line(f"listening on http://{shown}:{port} (web page at /, API docs at /docs); loading {config.source.label}")
    if config.exposed and config.api_key_env is None:
        on_line(f"warning: --host {config.host} is reachable from other machines and no --api-key-env is set")
    server = uvicorn.Server(uvicorn.Config(app, log_level="info", timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S))
    worker.start()
    try:
        with quiet_exit_signals():
            server.run(sockets=[sock])
    finally:
        sock.close()
        worker.stop()
        if worker.loaded is not None:
            worker.loaded.pipeline.close()
    if fatal:
        raise fatal[0]
    on_line("stopped: every request taken was answered")
