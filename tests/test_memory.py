"""seal.memory.PhaseMeter: time and peak memory per phase."""

import mmap
import os
import threading
import time

import pytest
import torch

from seal.memory import PhaseMeter, kernel_peak

MiB = 1024 * 1024


def touch(mb: int) -> mmap.mmap:
    """Fresh anonymous pages, each written once: unlike a bytearray, they cannot be pages the allocator
    (TCMalloc, under `LD_PRELOAD`) kept resident from earlier tests, so the RSS must grow by `mb` MB."""
    block = mmap.mmap(-1, mb * MiB)
    for offset in range(0, mb * MiB, mmap.PAGESIZE):
        block[offset] = 1
    return block


def test_a_phase_shorter_than_the_interval_is_still_sampled_while_it_runs():
    """The sampler (used with `processes=True`, and where Linux does not keep the peak): with a 10 s interval,
    a phase of about 0.3 s that holds 200 MB only in its middle still shows them: the first samples come
    sooner than the interval (a forked bench probe of the tiny model lasts about 0.2 s). The interval is far
    longer than the phase so that a busy machine, which stretches the phase, cannot make the phase outlast it
    (CI once took 1.13 s for it)."""
    meter = PhaseMeter(torch.device("cpu"), interval_s=10.0, processes=True)
    with meter.phase("idle"):
        pass
    with meter.phase("short"):
        time.sleep(0.05)
        block = touch(200)
        time.sleep(0.2)
        block.close()
        time.sleep(0.05)
    assert meter.peak_mb["short"] > meter.peak_mb["idle"] + 150
    assert 0.3 <= meter.seconds["short"] < meter.interval_s


needs_kernel_peak = pytest.mark.skipif(not kernel_peak().available, reason="Linux's VmHWM is not available")


@needs_kernel_peak
def test_the_kernels_peak_catches_a_spike_with_no_sampler_running():
    """200 MB held for no time at all (written, then unmapped at once) show in the phase's peak, and no
    thread ran beside the phase: the peak is Linux's own high-water mark, not a sample."""
    meter = PhaseMeter(torch.device("cpu"), interval_s=10.0)
    with meter.phase("idle"):
        pass
    threads = threading.active_count()
    with meter.phase("spike"):
        assert threading.active_count() == threads
        touch(200).close()
    assert meter.peak_mb["spike"] > meter.peak_mb["idle"] + 150
    with meter.phase("after"):  # the mark was reset: the spike is not this phase's
        pass
    assert meter.peak_mb["after"] < meter.peak_mb["spike"] - 150


@needs_kernel_peak
def test_nested_phases_each_keep_their_own_peak():
    """A spike in an outer phase before an inner one begins stays the outer phase's peak although the inner
    phase resets the mark; a spike inside the inner phase counts for both; across two meters alike."""
    outer, inner = PhaseMeter(torch.device("cpu")), PhaseMeter(torch.device("cpu"))
    with outer.phase("idle"):
        pass
    with outer.phase("outer"):
        touch(300).close()
        with inner.phase("quiet"):
            pass
        with inner.phase("inner"):
            touch(150).close()
    idle = outer.peak_mb["idle"]
    assert outer.peak_mb["outer"] > idle + 250
    assert inner.peak_mb["quiet"] < idle + 100
    assert idle + 100 < inner.peak_mb["inner"] < idle + 250


@needs_kernel_peak
def test_a_child_forked_inside_a_phase_measures_its_own_phases():
    """A child forked while its parent is inside a phase starts with no phase open (the parent's, and a lock
    the parent might hold, stay the parent's) and measures its own spike; the parent's phase is unaffected."""
    meter = PhaseMeter(torch.device("cpu"))
    with meter.phase("idle"):
        pass
    with meter.phase("parent"):
        read, write = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child: report, never return into pytest
            status = 1
            try:
                child = PhaseMeter(torch.device("cpu"))
                fresh = not kernel_peak()._open
                with child.phase("idle"):
                    pass
                with child.phase("spike"):
                    touch(100).close()
                status = 0 if fresh and child.peak_mb["spike"] > child.peak_mb["idle"] + 80 else 2
            finally:
                os.write(write, bytes([status]))
                os._exit(0)
        os.close(write)
        reply = os.read(read, 1)
        os.waitpid(pid, 0)
        os.close(read)
    assert reply == bytes([0])
    assert meter.peak_mb["parent"] < meter.peak_mb["idle"] + 50
