"""seal.allocator: `python -m seal.train`, `seal.bench` and `seal` restart once with TCMalloc preloaded."""

import os
import subprocess
import sys

import pytest

from seal import allocator

needs_tcmalloc = pytest.mark.skipif(
    sys.platform != "linux" or allocator.library() is None,
    reason="no TCMalloc here (make setup unpacks it where apt-get works)",
)


def run(*args: str, **env: str) -> subprocess.CompletedProcess:
    return run_in(dict(os.environ), *args, **env)


def run_in(environ: dict[str, str], *args: str, **env: str) -> subprocess.CompletedProcess:
    """`python *args` with `environ`, less the allocator's settings and mark of a restart, plus `env`."""
    unset = ("LD_PRELOAD", allocator.ENV, allocator._STARTED)
    clean = {k: v for k, v in environ.items() if k not in unset}
    return subprocess.run(
        [sys.executable, *args], env={**clean, **env}, capture_output=True, text=True, timeout=120
    )


@needs_tcmalloc
def test_a_module_run_restarts_once_with_tcmalloc_in_the_same_process():
    """`python -m seal` starts as seal.train and seal.bench do: importing the package restarts the process
    (same PID) with the library preloaded, once, and the restarted one goes on."""
    done = run("-m", "seal")
    assert done.returncode == 0, done.stderr
    assert "allocator: tcmalloc" in done.stdout.splitlines()
    code = (
        "import os; print(os.getpid(), flush=True); from seal import allocator; allocator.preload(); "
        "print(os.getpid(), allocator.in_use())"
    )
    first, again, last = run("-c", code).stdout.splitlines()  # the restart runs the program from the top
    assert again == first and last.split() == [first, "tcmalloc"]  # in place (same PID), and only once


@needs_tcmalloc
def test_the_restart_keeps_freed_pages_unless_the_environment_sets_a_release_rate():
    code = (
        "import os; from seal import allocator; allocator.preload(); "
        "print(allocator.in_use(), os.environ.get('TCMALLOC_RELEASE_RATE'))"
    )
    clean = {k: v for k, v in os.environ.items() if k != "TCMALLOC_RELEASE_RATE"}
    assert run_in(clean, "-c", code).stdout.split() == ["tcmalloc", "0"]
    assert run_in({**clean, "TCMALLOC_RELEASE_RATE": "5"}, "-c", code).stdout.split() == ["tcmalloc", "5"]


@needs_tcmalloc
def test_system_keeps_glibc_malloc_and_importing_seal_restarts_nothing():
    assert "allocator: system" in run("-m", "seal", SEAL_ALLOCATOR="system").stdout.splitlines()
    imported = run("-c", "from seal import allocator, train; print(allocator.in_use())")
    assert imported.stdout.strip() == "system", imported.stderr


def test_an_unknown_allocator_is_refused():
    refused = run("-m", "seal", SEAL_ALLOCATOR="jemalloc")
    assert (
        refused.returncode != 0 and "SEAL_ALLOCATOR='jemalloc': expected tcmalloc or system" in refused.stderr
    )


def test_a_restart_that_fails_goes_on_with_glibc_and_says_so(monkeypatch, capsys):
    def refuse(*args):
        raise PermissionError("exec refused")

    monkeypatch.delenv(allocator._STARTED, raising=False)
    monkeypatch.delenv(allocator.ENV, raising=False)
    monkeypatch.setattr(allocator.sys, "platform", "linux")
    monkeypatch.setattr(allocator, "library", lambda: "/lib/libtcmalloc_minimal.so.4")
    monkeypatch.setattr(allocator.os, "execve", refuse)
    allocator.preload()  # returns instead of restarting
    assert "could not restart with TCMalloc (exec refused); using glibc's malloc" in capsys.readouterr().err


@needs_tcmalloc
def test_memory_freed_under_tcmalloc_leaves_the_resident_set_when_released():
    """TCMalloc keeps a large freed block resident (which is why the weights laid out for each generation
    batch made a whole run's peak RSS grow); `release_free_memory` hands it back."""
    code = (
        "import torch; from seal import allocator\n"
        "def rss(): return int(open('/proc/self/status').read().split('VmRSS:')[1].split()[0]) // 1024\n"
        "x = torch.ones(100 * 2**20); peak = rss(); del x; freed = rss()\n"
        "allocator.release_free_memory(); print(allocator.in_use(), peak, freed, rss())"
    )
    done = run("-c", code, LD_PRELOAD=allocator.library(), **{allocator._STARTED: "1"})
    name, peak, freed, released = done.stdout.split()
    assert name == "tcmalloc", done.stderr
    assert int(freed) > int(peak) - 50  # 400 MB freed, still resident
    assert int(released) < int(freed) - 300  # handed back
