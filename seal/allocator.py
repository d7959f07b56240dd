"""TCMalloc instead of glibc's malloc for CPU runs, preloaded by starting the process again once.

A training pass on a CPU allocates and frees tens of thousands of tensors. glibc's malloc is slow at that
and gives large freed blocks back to the system, so the next pass faults the same pages in again. TCMalloc
keeps them. Measured on the bench (2-core AVX-512 BF16 CPU, benchmarks/README.md): the update about 14 %
faster and its peak memory lower. At its default release rate TCMalloc still hands some freed pages back as
it goes, and on the 2-core AMD EPYC the bench's update spent about 4 % of its time faulting them in again;
so the restart sets `TCMALLOC_RELEASE_RATE=0` (unless the environment sets it), and `release_free_memory`
gives the free pages back between phases instead. An allocator must be in place before the first
allocation, so `preload` starts the command again with `LD_PRELOAD` set, before anything else runs
(PyTorch's own CPU launcher, `torch.backends.xeon.run_cpu`, preloads TCMalloc the same way).

`make setup` unpacks Debian's `libtcmalloc-minimal4` into the virtual environment; a system-wide TCMalloc
(`apt install libtcmalloc-minimal4`, gperftools) is used otherwise. Without either, or with
`SEAL_ALLOCATOR=system`, runs keep glibc's malloc. `python -m seal` prints which one runs get.
"""

from __future__ import annotations

import ctypes.util
import functools
import os
import sys
from collections.abc import Callable
from pathlib import Path

ENV = "SEAL_ALLOCATOR"  # tcmalloc (default) | system
_STARTED = "SEAL_ALLOCATOR_PRELOADED"  # set in the restarted process, so that it does not restart again
LIBRARY = "libtcmalloc_minimal.so.4"


def library() -> str | None:
    """The TCMalloc library `make setup` unpacked into this environment, else a system-wide one, else None."""
    local = sorted((Path(sys.prefix) / "tcmalloc").glob(f"usr/lib/*/{LIBRARY}"))
    if local:
        return str(local[0])
    return ctypes.util.find_library("tcmalloc_minimal")  # a soname the dynamic loader finds, or None


def preload() -> None:
    """Restart this process (same interpreter, arguments and PID) with TCMalloc preloaded, unless
    `SEAL_ALLOCATOR=system`, off Linux, without the library, or in the restarted process itself. Call it
    before anything else has run (`seal/__init__.py` does, for `python -m seal.train` and `seal.bench`)."""
    choice = os.environ.get(ENV, "tcmalloc")
    if choice not in ("tcmalloc", "system"):
        raise SystemExit(f"{ENV}={choice!r}: expected tcmalloc or system")
    if choice == "system" or sys.platform != "linux" or os.environ.get(_STARTED):
        return
    lib = library()
    if lib is None:
        return
    env = dict(os.environ)
    env["LD_PRELOAD"] = ":".join(filter(None, [lib, env.get("LD_PRELOAD")]))
    env.setdefault("TCMALLOC_LARGE_ALLOC_REPORT_THRESHOLD", str(2**40))  # no message per allocation > 1 GB
    # Keep freed pages for the next pass instead of handing some back to the system as they are freed (the
    # default rate, 1), which made every training pass fault them in again; `release_free_memory` hands
    # them back between phases instead.
    env.setdefault("TCMALLOC_RELEASE_RATE", "0")
    env[_STARTED] = "1"
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)
    except OSError as err:  # returns only if the restart failed: go on as we are, with glibc's malloc
        print(f"seal: could not restart with TCMalloc ({err}); using glibc's malloc", file=sys.stderr)


def in_use() -> str:
    """The allocator of this process: tcmalloc if its library is loaded, else system."""
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        return "system"
    return "tcmalloc" if "libtcmalloc" in maps else "system"


def release_free_memory() -> None:
    """Hand the memory TCMalloc holds free back to the system, so that what was just freed in bulk does not
    stay in the process's resident set beneath the next phase: the weights laid out for a generation batch
    (`LM.packed_weights`), the RL fine-tuning's working memory (`seal.rl.sft_merge`). Nothing under glibc's
    malloc, which returns large blocks itself."""
    release = _tcmalloc_release()
    if release is not None:
        release()


@functools.cache
def _tcmalloc_release() -> Callable[[], None] | None:
    if in_use() != "tcmalloc":
        return None
    return getattr(ctypes.CDLL(None), "MallocExtension_ReleaseFreeMemory", None)  # LD_PRELOAD's symbols
