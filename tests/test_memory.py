"""seal.memory.PhaseMeter: time and peak memory per phase."""

import mmap
import time

import torch

from seal.memory import PhaseMeter

MiB = 1024 * 1024


def test_a_phase_shorter_than_the_interval_is_still_sampled_while_it_runs():
    """With a 10 s interval, a phase of about 0.3 s that holds 200 MB only in its middle still shows them: the
    first samples come sooner than the interval (a forked bench probe of the tiny model lasts about 0.2 s).
    The interval is far longer than the phase so that a busy machine, which stretches the phase, cannot make
    the phase outlast it (CI once took 1.13 s for it)."""
    meter = PhaseMeter(torch.device("cpu"), interval_s=10.0)
    with meter.phase("idle"):
        pass
    with meter.phase("short"):
        time.sleep(0.05)
        # Fresh anonymous pages, each written once: unlike a bytearray, they cannot be pages the allocator
        # (TCMalloc, under `LD_PRELOAD`) kept resident from earlier tests, so the RSS must grow by 200 MB.
        block = mmap.mmap(-1, 200 * MiB)
        for offset in range(0, 200 * MiB, mmap.PAGESIZE):
            block[offset] = 1
        time.sleep(0.2)
        block.close()
        time.sleep(0.05)
    assert meter.peak_mb["short"] > meter.peak_mb["idle"] + 150
    assert 0.3 <= meter.seconds["short"] < meter.interval_s
