"""The parent side of ``--gpus N``: check the request, then run the same command again in N processes under torchrun
(``torch.distributed.run``, the standard launcher) and wait for them.

Rank 0 inherits the terminal: it prints the results and writes the outputs. The other ranks' stdout and stderr go
to log files in a temporary directory. A worker that fails with a fluxtrt error writes that one line to the
directory, and the parent prints it once; any other failure names the process, its exit code and its log.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

from fluxtrt.errors import DeviceError, FluxtrtError, MissingDependencyError

# Set by the parent for its workers: the directory of their error files and logs.
LAUNCH_DIR_ENV = "FLUXTRT_LAUNCH_DIR"
# What fluxtrt needs of diffusers for --gpus: ContextParallelConfig and the context-parallel hooks (0.42).
DIFFUSERS_INSTALL = "pip install 'diffusers==0.42.1'"
_TORCHRUN_LOGGERS = ("torch.distributed.run", "torch.distributed.elastic", "torch.distributed.launcher")


def in_worker() -> bool:
    """Whether this process is one of the processes torchrun started (it sets RANK and TORCHELASTIC_RUN_ID)."""
    return "RANK" in os.environ and "TORCHELASTIC_RUN_ID" in os.environ


def is_main_process() -> bool:
    """True outside torchrun and on rank 0: the process that prints results and writes outputs."""
    return os.environ.get("RANK", "0") == "0"


def require_context_parallel() -> None:
    """Raise MissingDependencyError when torch.distributed or diffusers' context parallelism is missing."""
    import torch

    if not torch.distributed.is_available():
        raise MissingDependencyError("torch.distributed", "--gpus", "install a PyTorch build with distributed support")
    try:
        from diffusers import ContextParallelConfig  # noqa: F401
        from diffusers.hooks import apply_context_parallel  # noqa: F401
    except ImportError:
        package = "diffusers (0.42, with ContextParallelConfig)"
        raise MissingDependencyError(package, "--gpus", DIFFUSERS_INSTALL) from None


def check_gpus(gpus: int, device: str) -> None:
    """Raise DeviceError when ``gpus`` processes cannot each get a GPU of this host.

    On ``--device cpu`` the processes share the CPU (gloo), what CI runs; ``auto`` means CUDA here, since N
    processes on a machine without a GPU are never what ``--gpus`` asks for.
    """
    if gpus <= 1 or device == "cpu":
        return
    import torch

    count = torch.cuda.device_count()
    if gpus > count:
        fix = f"pass --gpus {count} or fewer" if count > 1 else "drop --gpus"
        raise DeviceError(
            f"--gpus {gpus} asks for {gpus} GPUs but this host has {count} CUDA GPU(s) visible to PyTorch: {fix} "
            f"(or --device cpu to run {gpus} CPU processes)"
        )


def relaunch(gpus: int, device: str, args: Sequence[str], check: Callable[[], None] | None = None) -> bool:
    """In the parent of a ``--gpus N`` command (N > 1): check, run ``fluxtrt ARGS`` in N processes, return True.

    Returns False where there is nothing to launch: N is 1, or this process is already a worker. ``check`` runs
    after the GPUs and the library are found and before any worker starts (what the command can refuse early).

    Raises:
        DeviceError, MissingDependencyError: the GPUs or the library are not there.
        FluxtrtError: a worker failed (its one-line error, or which process stopped and where its log is).
    """
    if gpus <= 1 or in_worker():
        return False
    check_gpus(gpus, device)
    require_context_parallel()
    if check is not None:
        check()
    launch(gpus, args)
    return True


def launch(gpus: int, args: Sequence[str], script: str | None = None) -> None:
    """Run ``python -m fluxtrt ARGS`` (or ``python SCRIPT ARGS``) in ``gpus`` processes under torchrun.

    Args:
        gpus: processes (one per GPU; ``--standalone``, one host).
        args: the command line of every worker.
        script: a Python file to run instead of the fluxtrt module (the benchmarks).

    Raises:
        FluxtrtError: a worker failed.
    """
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    workdir = Path(tempfile.mkdtemp(prefix="fluxtrt-gpus-"))
    redirects = ",".join(f"{rank}:3" for rank in range(1, gpus)) or "0"  # 3: stdout and stderr to files
    target = [script] if script is not None else ["--module", "fluxtrt"]
    argv = ["--standalone", "--nnodes", "1", "--nproc-per-node", str(gpus), "--log-dir", str(workdir / "logs"),
            "--redirects", redirects, *target, *args]  # fmt: skip
    keep = False
    try:
        with _worker_environment(gpus, workdir), _quiet_torchrun():
            run(parse_args(argv))
    except ChildFailedError as exc:
        if exc.get_first_failure()[1].exitcode in (130, -2):  # a worker stopped by Ctrl-C (SIGINT)
            raise KeyboardInterrupt from None
        error, keep = _failure(exc, gpus, workdir)
        raise error from None
    except SignalException:  # Ctrl-C (or SIGTERM): torchrun has stopped the workers; the CLI says "interrupted"
        raise KeyboardInterrupt from None
    finally:
        if not keep:
            shutil.rmtree(workdir, ignore_errors=True)


def record_worker_error(message: str) -> bool:
    """In a worker launched by ``launch``: write ``message`` for the parent to print and return True (the worker
    then exits quietly); elsewhere return False."""
    directory, rank = os.environ.get(LAUNCH_DIR_ENV), os.environ.get("RANK")
    if not directory or rank is None or not in_worker():
        return False
    path = Path(directory) / f"error-rank{rank}.txt"
    tmp = path.with_suffix(".tmp")
    tmp.write_text(message.strip().splitlines()[0] if message.strip() else "failed")
    tmp.replace(path)
    return True


def _failure(exc, gpus: int, workdir: Path) -> tuple[FluxtrtError, bool]:
    """The error to raise for a failed launch, and whether to keep the logs (when they are all there is)."""
    for rank in range(gpus):
        path = workdir / f"error-rank{rank}.txt"
        if path.is_file():
            return FluxtrtError(path.read_text().strip()), False
    rank, failure = exc.get_first_failure()
    how = f"signal {failure.signal_name()}" if failure.exitcode < 0 else f"exit code {failure.exitcode}"
    where = "its output is above" if rank == 0 else f"its output is in {workdir / 'logs'}"
    return FluxtrtError(f"process {rank} of {gpus} stopped ({how}): {where}; --verbose shows the traceback"), True


@contextlib.contextmanager
def _worker_environment(gpus: int, workdir: Path) -> Iterator[None]:
    """The workers' environment: where to leave errors, and CPU threads shared out (torchrun would set 1 with a
    warning)."""
    saved = {k: os.environ.get(k) for k in (LAUNCH_DIR_ENV, "OMP_NUM_THREADS")}
    os.environ[LAUNCH_DIR_ENV] = str(workdir)
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // gpus)))
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@contextlib.contextmanager
def _quiet_torchrun() -> Iterator[None]:
    """torchrun's own log lines (its banner, a failure's report) stay off the terminal: fluxtrt says what failed."""
    names = [n for n in logging.root.manager.loggerDict if n.startswith(_TORCHRUN_LOGGERS)]  # each has its own level
    loggers = [logging.getLogger(name) for name in {*_TORCHRUN_LOGGERS, *names}]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)
