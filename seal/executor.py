"""Where the inner loops of a round run.

The knowledge task hands its inner loops over in chunks (`InnerLoops` in seal/tasks/knowledge.py): a chunk's
updates train together and its answers come from one generation call, so a chunk is the unit of work, of
caching and of resume. An executor computes the chunks that are not cached yet and yields each result as soon
as it is ready, so the driver caches it at once:

  local      in this process, one chunk after the other (the default)
  processes  in worker processes forked from this one, one thread each: on a CPU machine, a worker per core
             computes more than one process with a thread per core, since a batched pass of a small model is
             too small to keep several cores busy (benchmarks/README.md measures it). Each worker starts with
             this process's model as it is when the chunk begins, so it holds the learner's current weights
             without loading or sending anything, and it exits when its chunk is done. CPU only: a forked
             process cannot use CUDA, nor the OpenMP threads of its parent (hence one thread each).
  ray    on Ray workers (`pip install -e .[ray]`), each holding its own replica of the learner: one per GPU
         with `executor.gpus_per_worker=1`, or `executor.cpus_per_worker` CPUs each. The driver keeps the
         outer loop, the cache and resume. Before a chunk, a worker takes the learner's weights whenever they
         changed (ReST-EM fine-tunes the learner between rounds), so it computes what the local executor
         would: the same chunks, the same seeds (they come from the inner loops' keys), the same weights.

A chunk whose worker dies (killed, out of memory, a lost node) is run again, on a restarted worker, up to
`executor.max_retries` times; after that it is yielded as `WorkerLost` and the task records its inner loops as
failed (and does not cache them, so a resumed run computes them again). An exception raised by the task's own
code is not retried: it is a bug, and it stops the run like any other.
"""

from __future__ import annotations

import collections
import hashlib
import logging
import math
import multiprocessing
import os
import pickle
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from multiprocessing.connection import wait as wait_ready
from typing import Any, Protocol

import psutil
import torch

from seal.config import ExecutorConfig

log = logging.getLogger(__name__)
# How long a worker killed for missing executor.chunk_timeout_s may take to exit before it is given up on.
KILL_GRACE_S = 30.0

Weights = dict[str, torch.Tensor]


@dataclass
class ChunkResult:
    outcomes: list[dict[str, Any]]  # one per inner loop of the chunk, in order
    seconds: dict[str, float] = field(default_factory=dict)  # per phase, in the process that computed it
    peak_mb: dict[str, float] = field(default_factory=dict)


class WorkerLost(RuntimeError):
    """A chunk whose worker died on every try."""


class Runner(Protocol):
    """Computes chunks of inner loops on one model (the task's code; see knowledge.ChunkRunner)."""

    def compute(self, chunk: list[Any], desc: str) -> ChunkResult: ...

    def load_weights(self, weights: Weights) -> None: ...


class Executor(Protocol):
    retries: int  # chunks run again after their worker died, in this process's lifetime
    workers: int  # chunks computed at once

    def map(self, chunks: list[tuple[list[Any], str]]) -> Iterator[tuple[int, ChunkResult | WorkerLost]]:
        """(index into `chunks`, its result) for every (chunk, progress label), in the order they finish."""
        ...

    def close(self) -> None: ...


class LocalExecutor:
    def __init__(self, runner: Runner):
        self.runner, self.retries, self.workers = runner, 0, 1

    def map(self, chunks: list[tuple[list[Any], str]]) -> Iterator[tuple[int, ChunkResult | WorkerLost]]:
        for index, (chunk, desc) in enumerate(chunks):
            yield index, self.runner.compute(chunk, desc)

    def close(self) -> None:
        pass


class ProcessExecutor:
    """Each chunk is computed by a process forked for it, at most `workers` at once (0: one per physical
    core). A worker that dies (killed, out of memory), or is killed for taking longer than `chunk_timeout_s`,
    has its chunk run again by a new one, up to `max_retries` times; an exception in the task's code stops
    the run with the worker's traceback."""

    def __init__(self, cfg: ExecutorConfig, make_runner: Callable[[], Runner]):
        if cfg.workers < 0 or cfg.max_retries < 0 or cfg.chunk_timeout_s < 0:
            raise ValueError(f"executor.workers, max_retries and chunk_timeout_s must be >= 0, got {cfg}")
        if cfg.cpus_per_worker != 1 or cfg.gpus_per_worker:
            raise ValueError(
                "executor=processes forks workers of one CPU thread each (executor.cpus_per_worker=1, "
                "gpus_per_worker=0); for workers with several threads or a GPU, use executor=ray"
            )
        self.workers, self.max_retries = forked_workers(cfg), cfg.max_retries
        self.timeout = cfg.chunk_timeout_s
        self.runner = make_runner()  # built here, as the local executor builds its own; workers inherit it
        self.retries = 0

    def map(self, chunks: list[tuple[list[Any], str]]) -> Iterator[tuple[int, ChunkResult | WorkerLost]]:
        if not chunks:
            return
        if torch.cuda.is_initialized():
            raise RuntimeError(
                "executor=processes forks CPU workers, and a forked process cannot use CUDA, which this one "
                "has initialised: on GPUs use executor=ray with executor.gpus_per_worker=1"
            )
        context = multiprocessing.get_context("fork")
        waiting = collections.deque(range(len(chunks)))
        tries: collections.Counter[int] = collections.Counter()
        # the parent's end of a worker's pipe -> (chunk, process, when it started)
        running: dict[Any, tuple[int, Any, float]] = {}
        try:
            while waiting or running:
                while waiting and len(running) < self.workers:
                    index = waiting.popleft()
                    tries[index] += 1
                    receive, send = context.Pipe(duplex=False)
                    worker = context.Process(
                        target=_compute_forked, args=(send, self.runner, *chunks[index]), daemon=True
                    )
                    worker.start()
                    send.close()  # the worker holds its copy: end of file here once it exits
                    running[receive] = (index, worker, time.monotonic())
                for receive, expired in self._ready(running):
                    index, worker, _ = running.pop(receive)
                    status, payload = "lost", None
                    expired = expired and not receive.poll(0)  # an answer that came at the deadline stands
                    if expired:  # hung: killed, and counted as a worker that died
                        worker.kill()
                        log.warning("chunk %d: no answer in %g s; its worker was killed", index, self.timeout)
                    else:
                        try:
                            status, payload = receive.recv()
                        except (EOFError, OSError, pickle.UnpicklingError):  # it died before or while sending
                            pass
                    receive.close()
                    _join(worker)
                    why = f"killed after {self.timeout:g} s without an answer" if expired else None
                    if status == "ok":
                        yield index, payload
                    elif status == "error":
                        raise RuntimeError(f"chunk {index} failed in its worker process:\n{payload}")
                    else:
                        why = why or f"exit code {worker.exitcode}"
                        if (failed := lost_chunk(self, index, why, tries[index], waiting)) is not None:
                            yield index, failed
        finally:  # stopped early (an error, an interrupt, the caller gave up): no worker outlives the map
            for receive, (_, worker, _) in running.items():
                worker.kill()
                _join(worker)
                receive.close()

    def _ready(self, running: dict[Any, tuple[int, Any, float]]) -> list[tuple[Any, bool]]:
        """The pipes of the workers that answered or died, with False, and of those past chunk_timeout_s
        without either, with True; waits until there is one."""
        timeout = None
        if self.timeout:
            first = min(started for _, _, started in running.values())
            timeout = max(0.0, first + self.timeout - time.monotonic())
        ready = wait_ready(list(running), timeout=timeout)
        now = time.monotonic()
        late = [
            r
            for r, (_, _, started) in running.items()
            if self.timeout and r not in ready and now - started >= self.timeout
        ]
        return [(r, False) for r in ready] + [(r, True) for r in late]

    def close(self) -> None:
        pass


def lost_chunk(
    executor: ProcessExecutor | RayExecutor, index: int, why: str, tries: int, waiting: collections.deque[int]
) -> WorkerLost | None:
    """A chunk whose worker died (`why`) after `tries` tries: queued again at the front of `waiting` and
    counted in `executor.retries` (None), or, past `executor.max_retries`, its WorkerLost."""
    if tries > executor.max_retries:
        log.error("chunk %d: its worker died %d times; its inner loops fail", index, tries)
        return WorkerLost(f"worker died {tries} times: {why}")
    executor.retries += 1
    log.warning(
        "chunk %d: its worker died (%s); try %d of %d", index, why, tries + 1, executor.max_retries + 1
    )
    waiting.appendleft(index)
    return None


def _join(worker: Any) -> None:
    """Wait for a worker process to end; one that a kill does not end within KILL_GRACE_S (uninterruptible
    sleep, e.g. on a hung NFS mount) is left behind with an error in the log rather than hanging the run."""
    worker.join(timeout=KILL_GRACE_S)
    if worker.is_alive():
        log.error(
            "worker process %d did not exit %g s after it was killed; left behind", worker.pid, KILL_GRACE_S
        )


def forked_workers(cfg: ExecutorConfig) -> int:
    """How many worker processes executor=processes runs at once: `workers`, 0 = one per physical core."""
    return cfg.workers or psutil.cpu_count(logical=False) or 1


def _compute_forked(send: Any, runner: Runner, chunk: list[Any], desc: str) -> None:
    """A worker's life: one thread, one chunk, then its result (or its error's traceback) to the parent."""
    torch.set_num_threads(1)
    try:
        send.send(("ok", runner.compute(chunk, desc)))
    except Exception:
        send.send(("error", traceback.format_exc()))
    finally:
        send.close()


def weights_digest(weights: Weights) -> str:
    """A fingerprint of the weights' exact bytes: a worker reloads them only when it changed."""
    digest = hashlib.blake2b(digest_size=16)
    for name in sorted(weights):
        flat = weights[name].detach().reshape(-1).contiguous()
        digest.update(name.encode())
        digest.update(flat.view(torch.uint8).cpu().numpy().tobytes())
    return digest.hexdigest()


class InnerLoopWorker:
    """A Ray actor: one replica of the learner and the task's runner (built in the worker's own process)."""

    def __init__(self, make_runner: Callable[[], Runner]):
        self.runner = make_runner()
        self.version: str | None = None

    def compute(self, version: str, weights: list[Any], chunk: list[Any], desc: str) -> ChunkResult:
        import ray

        if version != self.version:  # `weights` is [ObjectRef], so that Ray fetches it only when needed
            self.runner.load_weights(ray.get(weights[0]))
            self.version = version
        return self.runner.compute(chunk, desc)

    def pid(self) -> int:
        return os.getpid()


def import_ray():
    try:
        import ray
    except ImportError as err:
        raise RuntimeError("executor=ray needs Ray: pip install -e '.[ray]'") from err
    return ray


def connect(ray, cfg: ExecutorConfig) -> bool:
    """Join the configured cluster, or start a local one. True when this process started Ray."""
    if ray.is_initialized():
        return False
    options = {"include_dashboard": False, "log_to_driver": True}
    if cfg.address != "auto":
        ray.init(address=cfg.address, **options)  # an error names the address when it cannot be reached
        return True
    try:
        ray.init(address="auto", **options)
        log.info("ray: joined the running cluster %s", ray.get_runtime_context().gcs_address)
    except ConnectionError:
        # No cluster: a local one with room for exactly the configured workers.
        ray.init(num_cpus=cfg.workers * cfg.cpus_per_worker, **options)
        log.info("ray: started a local cluster for %d workers", cfg.workers)
    return True


class RayExecutor:
    """Chunks go to `executor.workers` actors; each actor takes the next chunk as soon as it is free. An actor
    that dies, or is killed for taking longer than `chunk_timeout_s`, is restarted by Ray, and its chunk run
    again, up to `max_retries` times."""

    def __init__(
        self, cfg: ExecutorConfig, make_runner: Callable[[], Runner], weights: Callable[[], Weights]
    ):
        if cfg.workers < 1 or cfg.max_retries < 0 or cfg.chunk_timeout_s < 0:
            raise ValueError(
                f"executor.workers must be >= 1, max_retries and chunk_timeout_s >= 0, got {cfg}"
            )
        self.ray = import_ray()
        self.cfg, self.make_runner, self.weights = cfg, make_runner, weights
        self.workers, self.max_retries = cfg.workers, cfg.max_retries
        self.actors: list[Any] = []
        self.hung: list[Any] = []  # workers that a kill did not end (see `map`)
        self.started = False
        self.version: str | None = None
        self.ref: Any = None
        self.retries = 0

    def _start(self) -> None:
        self.started = connect(self.ray, self.cfg)
        # A dead worker is restarted by Ray (its constructor loads the model again); the task that was running
        # on it is not retried by Ray but by `map`, which counts and bounds the tries.
        actor = self.ray.remote(InnerLoopWorker).options(
            num_cpus=self.cfg.cpus_per_worker,
            num_gpus=self.cfg.gpus_per_worker,
            max_restarts=-1,
            max_task_retries=0,
        )
        self.actors = [actor.remote(self.make_runner) for _ in range(self.cfg.workers)]
        # Each worker up (its model loaded) before any chunk is timed: chunk_timeout_s counts the chunk only.
        self.ray.get([worker.pid.remote() for worker in self.actors])

    def _publish(self) -> None:
        weights = {name: t.detach().cpu() for name, t in self.weights().items()}
        version = weights_digest(weights)
        if version != self.version:
            self.version, self.ref = version, self.ray.put(weights)

    def map(self, chunks: list[tuple[list[Any], str]]) -> Iterator[tuple[int, ChunkResult | WorkerLost]]:
        if not chunks:
            return
        if not self.actors and not self.hung:  # started once; with every worker hung, an error below
            self._start()
        self._publish()
        lost = (self.ray.exceptions.RayActorError, self.ray.exceptions.WorkerCrashedError)
        waiting = collections.deque(range(len(chunks)))
        tries = collections.Counter()
        idle = list(self.actors)
        timeout = self.cfg.chunk_timeout_s
        # a chunk's result -> (chunk, worker, deadline): its start + chunk_timeout_s, and once its worker was
        # killed for missing that, the kill's time + KILL_GRACE_S
        running: dict[Any, tuple[int, Any, float]] = {}
        killed: set[Any] = set()  # the results of chunks whose worker was killed for taking too long

        while waiting or running:
            if waiting and not idle and not running:
                raise RuntimeError(
                    f"all {len(self.hung)} Ray workers hung and did not exit when killed; "
                    "chunks are left undone"
                )
            while waiting and idle:
                index, worker = waiting.popleft(), idle.pop()
                chunk, desc = chunks[index]
                tries[index] += 1
                ref = worker.compute.remote(self.version, [self.ref], chunk, desc)
                running[ref] = (index, worker, time.monotonic() + timeout if timeout else math.inf)
            first = min(deadline for _, _, deadline in running.values())
            wait_s = None if first == math.inf else max(0.0, first - time.monotonic())
            done, _ = self.ray.wait(list(running), num_returns=1, timeout=wait_s)
            if not done:  # a deadline passed
                now = time.monotonic()
                for ref, (index, worker, deadline) in list(running.items()):
                    if now < deadline:
                        continue
                    if ref not in killed:  # hung: killed (Ray restarts it); its result then fails
                        log.warning("chunk %d: no answer in %g s; its worker was killed", index, timeout)
                        killed.add(ref)
                        self.ray.kill(worker, no_restart=False)
                        running[ref] = (index, worker, now + KILL_GRACE_S)
                        continue
                    # Still no end (a process in uninterruptible sleep, e.g. on a hung NFS mount): the worker
                    # is given no more chunks, and its chunk counts as one whose worker died.
                    log.error(
                        "chunk %d: its worker did not exit %g s after it was killed", index, KILL_GRACE_S
                    )
                    del running[ref]
                    killed.discard(ref)
                    self.actors.remove(worker)  # given no more chunks, in this map or later ones
                    self.hung.append(worker)
                    why = f"killed after {timeout:g} s without an answer, and did not exit"
                    if (failed := lost_chunk(self, index, why, tries[index], waiting)) is not None:
                        yield index, failed
                continue
            [done] = done
            index, worker, _ = running.pop(done)
            was_killed = done in killed
            killed.discard(done)
            try:
                result = self.ray.get(done)
            except lost as err:
                self._await_restart(worker)
                idle.append(worker)
                why = f"killed after {timeout:g} s without an answer" if was_killed else type(err).__name__
                if (failed := lost_chunk(self, index, why, tries[index], waiting)) is not None:
                    yield index, failed
                continue
            if was_killed:  # it answered as it was killed: the result stands, and the worker is restarting
                self._await_restart(worker)
            idle.append(worker)
            yield index, result

    def _await_restart(self, worker: Any, attempts: int = 600) -> None:
        """Wait until Ray has restarted a dead worker (its constructor loads the model again), so that a retry
        is not spent on a worker that is not back yet."""
        for _ in range(attempts):
            try:
                self.ray.get(worker.pid.remote())
                return
            except self.ray.exceptions.ActorUnavailableError:  # restarting: ask again shortly
                time.sleep(0.5)
        raise RuntimeError(f"a Ray worker did not come back within {attempts // 2} s of dying")

    def close(self) -> None:
        for worker in self.actors + self.hung:
            self.ray.kill(worker)
        self.actors, self.hung = [], []
        if self.started:
            self.ray.shutdown()
            self.started = False


def make_executor(
    cfg: ExecutorConfig,
    local: Callable[[], Runner],
    remote: Callable[[], Runner],
    weights: Callable[[], Weights],
) -> Executor:
    """`local` builds the runner of this process (forked workers inherit it); `remote` (picklable) builds a
    Ray worker's, with its own model; `weights` gives the learner's current weights for the Ray workers."""
    if cfg.name == "local":
        if cfg.chunk_timeout_s:
            raise ValueError(
                "executor.chunk_timeout_s needs workers to kill: executor=processes or executor=ray "
                "(executor=local computes in this process)"
            )
        return LocalExecutor(local())
    if cfg.name == "processes":
        return ProcessExecutor(cfg, local)
    if cfg.name == "ray":
        return RayExecutor(cfg, remote, weights)
    raise ValueError(f"unknown executor {cfg.name!r}: expected local, processes or ray")
