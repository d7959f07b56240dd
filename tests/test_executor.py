"""Executors of the inner loops (seal/executor.py): the weights' fingerprint; forked worker processes and Ray
workers that compute with the learner's current weights, retry a chunk whose worker died and give up after
the configured tries. Whole runs on workers, with a worker killed, are in tests/test_rl.py."""

import os
import struct
import sys
import time

import psutil
import pytest
import torch

from seal import executor as executor_module
from seal.config import ExecutorConfig
from seal.executor import (
    ChunkResult,
    LocalExecutor,
    ProcessExecutor,
    WorkerLost,
    import_ray,
    make_executor,
    weights_digest,
)
from seal.train import train
from tests.conftest import TINY_OVERRIDES, make_cfg


def test_the_weights_fingerprint_changes_with_any_weight_and_only_then():
    weights = {"a": torch.ones(3, 2), "b": torch.zeros(4, dtype=torch.bfloat16)}
    same = {"b": torch.zeros(4, dtype=torch.bfloat16), "a": torch.ones(3, 2)}
    assert weights_digest(weights) == weights_digest(same)
    same["b"][2] = 1e-3
    assert weights_digest(weights) != weights_digest(same)
    assert weights_digest({"a": torch.ones(3, 2)}) != weights_digest({"c": torch.ones(3, 2)})


def test_the_local_executor_computes_the_chunks_in_order_in_this_process():
    class Runner:
        def compute(self, chunk, desc):
            return ChunkResult([{"x": x, "desc": desc, "pid": os.getpid()} for x in chunk])

    results = list(LocalExecutor(Runner()).map([([1, 2], "a"), ([3], "b")]))
    assert [(i, r.outcomes) for i, r in results] == [
        (0, [{"x": 1, "desc": "a", "pid": os.getpid()}, {"x": 2, "desc": "a", "pid": os.getpid()}]),
        (1, [{"x": 3, "desc": "b", "pid": os.getpid()}]),
    ]


def test_forked_workers_see_the_current_weights_retry_a_dead_worker_s_chunk_and_give_up_after_the_bound(
    tmp_path,
):
    deaths = tmp_path / "deaths"

    class Runner:  # built once, in this process; each worker is forked with it as it is at that moment
        scale = 2.0

        def compute(self, chunk, desc):
            if "die" in chunk or ("die once" in chunk and not deaths.exists()):
                deaths.write_text("x")
                os._exit(1)
            values = [x * self.scale for x in chunk if isinstance(x, int)]
            return ChunkResult([{"v": values, "pid": os.getpid(), "threads": torch.get_num_threads()}])

    runner = Runner()
    cfg = ExecutorConfig(name="processes", workers=2, max_retries=1)
    executor = make_executor(cfg, local=lambda: runner, remote=None, weights=None)
    first = dict(executor.map([([1, 2], "a"), ([3, "die once"], "b"), ([4], "c")]))
    assert [first[i].outcomes[0]["v"] for i in range(3)] == [[2.0, 4.0], [6.0], [8.0]]
    assert executor.retries == 1 and deaths.exists()
    assert all(r.outcomes[0]["pid"] != os.getpid() and r.outcomes[0]["threads"] == 1 for r in first.values())
    assert len({r.outcomes[0]["pid"] for r in first.values()}) == 3  # a process per chunk

    runner.scale = 5.0  # e.g. the learner after a ReST-EM round: the next workers are forked with it
    second = dict(executor.map([([1], "d"), (["die"], "e"), ([2], "f")]))
    assert second[0].outcomes[0]["v"] == [5.0] and second[2].outcomes[0]["v"] == [10.0]
    assert isinstance(second[1], WorkerLost) and "worker died 2 times: exit code 1" in str(second[1])
    assert executor.retries == 2


class Hangs:
    """A runner whose chunk "hang" does not answer in time (a stuck file system, a deadlock)."""

    def compute(self, chunk, desc):
        if "hang" in chunk:
            time.sleep(90)  # finite: with the timeout broken, the test fails rather than hangs
        return ChunkResult([{"v": chunk, "pid": os.getpid()}])


def test_a_forked_worker_that_hangs_is_killed_after_the_timeout_retried_then_given_up():
    cfg = ExecutorConfig(name="processes", workers=2, max_retries=1, chunk_timeout_s=5)
    executor = make_executor(cfg, local=Hangs, remote=None, weights=None)
    before = set(psutil.Process().children())  # e.g. multiprocessing's resource tracker, from other tests
    start = time.monotonic()
    results = dict(executor.map([([1], "a"), (["hang"], "b"), ([2], "c")]))
    took = time.monotonic() - start
    assert results[0].outcomes[0]["v"] == [1] and results[2].outcomes[0]["v"] == [2]
    assert isinstance(results[1], WorkerLost)
    assert str(results[1]) == "worker died 2 times: killed after 5 s without an answer"
    assert executor.retries == 1 and 10 <= took < 80  # two tries of 5 s each
    assert set(psutil.Process().children()) <= before  # the hung workers are gone
    with pytest.raises(ValueError, match="chunk_timeout_s must be >= 0"):
        ProcessExecutor(ExecutorConfig(name="processes", chunk_timeout_s=-1), Hangs)
    with pytest.raises(ValueError, match="chunk_timeout_s needs workers to kill"):
        make_executor(ExecutorConfig(chunk_timeout_s=5), local=Hangs, remote=None, weights=None)


def test_a_forked_worker_s_error_stops_the_map_with_its_traceback_and_bad_settings_are_refused(monkeypatch):
    class Runner:
        def compute(self, chunk, desc):
            raise ValueError(f"no answer for {chunk}")

    executor = ProcessExecutor(ExecutorConfig(name="processes", workers=1), lambda: Runner())
    with pytest.raises(
        RuntimeError, match=r"(?s)chunk 0 failed in its worker process.*ValueError: no answer for \[7\]"
    ):
        list(executor.map([([7], "a")]))
    with pytest.raises(ValueError, match="one CPU thread each"):
        ProcessExecutor(ExecutorConfig(name="processes", cpus_per_worker=2), lambda: Runner())
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    with pytest.raises(RuntimeError, match="cannot use CUDA"):
        list(executor.map([([7], "a")]))


def test_ray_workers_take_new_weights_retry_a_dead_worker_s_chunk_and_give_up_after_the_bound(tmp_path):
    ray = pytest.importorskip("ray")
    deaths = tmp_path / "deaths"

    def make_runner():
        # Built inside each worker. Chunk "die once" kills its worker the first time only (a file counts the
        # deaths across restarts); chunk "die" kills it every time.
        class Runner:
            loads = 0

            def load_weights(self, weights):
                self.scale = float(weights["w"].sum())
                Runner.loads += 1

            def compute(self, chunk, desc):
                if "die" in chunk or ("die once" in chunk and not deaths.exists()):
                    deaths.write_text("x")
                    os._exit(1)
                if "hang" in chunk:
                    time.sleep(90)  # finite: with the timeout broken, the test fails rather than hangs
                values = [x * self.scale for x in chunk if isinstance(x, int)]
                return ChunkResult(
                    [{"v": values, "loads": Runner.loads, "pid": os.getpid()}], {"update": 1.0}
                )

        return Runner()

    weights = {"w": torch.ones(2)}
    # A chunk here takes milliseconds; chunk "hang" never answers.
    cfg = ExecutorConfig(name="ray", workers=2, cpus_per_worker=1, max_retries=1, chunk_timeout_s=5)
    executor = make_executor(cfg, local=None, remote=make_runner, weights=lambda: weights)
    try:
        first = dict(executor.map([([1, 2], "a"), ([3, "die once"], "b"), ([4], "c")]))
        assert [first[i].outcomes[0]["v"] for i in range(3)] == [[2.0, 4.0], [6.0], [8.0]]
        assert executor.retries == 1 and deaths.exists()
        # Two workers, both alive again, each loaded the weights once.
        assert {r.outcomes[0]["loads"] for r in first.values()} == {1}
        assert all(r.seconds == {"update": 1.0} for r in first.values())

        weights["w"] = torch.full((2,), 5.0)  # e.g. the learner after a ReST-EM round
        second = dict(executor.map([([1], "d"), (["die"], "e"), ([2], "f")]))
        assert second[0].outcomes[0]["v"] == [10.0] and second[2].outcomes[0]["v"] == [20.0]
        assert isinstance(second[1], WorkerLost) and "worker died 2 times" in str(second[1])
        assert executor.retries == 2  # "die" was tried twice (max_retries=1), then given up

        # A worker that hangs is killed after chunk_timeout_s (Ray restarts it), its chunk tried again, then
        # given up, while the other worker computes the other chunk.
        start = time.monotonic()
        third = dict(executor.map([(["hang"], "g"), ([3], "h")]))
        assert third[1].outcomes[0]["v"] == [30.0]
        assert str(third[0]) == "worker died 2 times: killed after 5 s without an answer"
        assert executor.retries == 3 and 10 <= time.monotonic() - start < 80
        after = dict(executor.map([([1], "i"), ([2], "j")]))  # both workers serve again
        assert [after[i].outcomes[0]["v"] for i in range(2)] == [[10.0], [20.0]]

        # A worker that a kill does not end (uninterruptible sleep; here the kill does nothing) is given up
        # KILL_GRACE_S after it, and its chunk counts as lost; with no worker left, the next map is an error.
        real_kill = executor.ray.kill
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(executor_module, "KILL_GRACE_S", 1.0)
            patch.setattr(executor.ray, "kill", lambda worker, no_restart=True: None)
            [(index, stuck)] = executor.map([(["hang"], "k")])
            assert str(stuck) == "worker died 2 times: killed after 5 s without an answer, and did not exit"
            assert executor.actors == [] and len(executor.hung) == 2
            with pytest.raises(RuntimeError, match="all 2 Ray workers hung"):
                list(executor.map([([1], "l")]))
        assert executor.ray.kill is real_kill
    finally:
        executor.close()
    assert not ray.is_initialized()  # it started Ray, so it stopped it


def test_ray_missing_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)
    with pytest.raises(RuntimeError, match=r"executor=ray needs Ray: pip install -e '\.\[ray\]'"):
        import_ray()


def test_unknown_executors_and_tasks_that_do_not_run_on_ray_are_refused_at_start(tmp_path):
    with pytest.raises(ValueError, match="unknown executor 'dask': expected local, processes or ray"):
        make_executor(ExecutorConfig(name="dask"), local=None, remote=None, weights=None)
    with pytest.raises(ValueError, match="task=few_shot task.mode=single runs with executor=local"):
        train(make_cfg(tmp_path, *TINY_OVERRIDES, "task=few_shot", "executor=ray"))
    with pytest.raises(ValueError, match="task=knowledge task.mode=cpt runs with executor=local"):
        train(make_cfg(tmp_path, *TINY_OVERRIDES, "task.mode=cpt", "executor=ray"))
    with pytest.raises(ValueError, match="task=few_shot task.mode=single runs with generation.backend=hf"):
        train(make_cfg(tmp_path, *TINY_OVERRIDES, "task=few_shot", "generation.backend=vllm"))


def test_a_worker_killed_while_sending_its_result_is_a_lost_worker_not_a_stopped_run(monkeypatch):
    """Killed half-way through writing its result (the OOM killer, say): the parent reads a cut message."""
    real = executor_module._compute_forked

    def cut_short(send, runner, chunk, desc):
        if chunk == ["cut"]:
            os.write(send.fileno(), struct.pack("!i", 100_000) + b"x" * 10)  # 10 of 100,000 bytes
            os._exit(9)
        return real(send, runner, chunk, desc)

    class Runner:
        def compute(self, chunk, desc):
            return ChunkResult([{"x": chunk}])

    monkeypatch.setattr(executor_module, "_compute_forked", cut_short)
    executor = make_executor(
        ExecutorConfig(name="processes", workers=2, max_retries=1), local=Runner, remote=None, weights=None
    )
    results = dict(executor.map([(["cut"], "a"), ([1], "b")]))
    assert isinstance(results[0], WorkerLost) and results[1].outcomes == [{"x": [1]}]
    assert executor.retries == 1
    assert not [p for p in psutil.Process().children() if p.status() == psutil.STATUS_ZOMBIE]
