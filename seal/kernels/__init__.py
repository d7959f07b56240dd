"""Compiled CPU kernels for the batched updater, built once per checkout from the C++ beside this file.

`torch.utils.cpp_extension` compiles them with the machine's C++ compiler and ninja the first time a process
asks (about 35 s on 2 cores), into torch's extension cache (`TORCH_EXTENSIONS_DIR`, by default
~/.cache/torch_extensions); later processes load the built library. `make setup` builds them. Where they
cannot be built (no compiler, no ninja), `cpu_kernels` says why and the updater keeps PyTorch's own
operations (`adapt.lora_kernel`).
"""

import hashlib
import logging
import sys
import threading
from pathlib import Path
from types import ModuleType
from typing import Any

log = logging.getLogger(__name__)
SOURCE = Path(__file__).with_name("cpu.cpp")


def extension_name(source: Path) -> str:
    """The extension's name for this source file, at this path with this text. torch builds an extension in a
    folder of its name and rebuilds it whenever the source's path or text differs from the last build's, so
    two checkouts (or versions) sharing one name would rebuild it in turn, about 35 s each time."""
    key = f"{source.resolve()}\n{source.read_text()}".encode()
    return f"seal_{source.stem}_{hashlib.sha1(key).hexdigest()[:10]}"


NAME = extension_name(SOURCE)
# -fopenmp: ATen's parallel_for is a template compiled into the extension, and without OpenMP it runs its
# whole range on the calling thread. Its OpenMP calls resolve to the runtime libtorch_cpu already loaded (one
# thread pool). Linux only: other compilers may lack the flag, and the kernels would not build at all.
FLAGS = ["-O2", "-fopenmp"] if sys.platform == "linux" else ["-O2"]
_lock = threading.Lock()
_loaded: dict[str, ModuleType | Exception] = {}


def cpu_kernels(required: bool = False) -> ModuleType | None:
    """The compiled extension of cpu.cpp (its functions are listed at the top of that file), built on first
    use. If it cannot be built or loaded: with `required` a RuntimeError saying why, else a warning (once per
    process) and None."""
    with _lock:
        if NAME not in _loaded:
            try:
                from torch.utils import cpp_extension

                _loaded[NAME] = cpp_extension.load(NAME, [str(SOURCE)], extra_cflags=FLAGS, verbose=False)
            except Exception as error:  # a compiler, ninja or a header missing; a failed compile
                _loaded[NAME] = error
                if not required:
                    log.warning(
                        "adapt.lora_kernel: the C++ kernels could not be built (%s: %s); the batched updater "
                        "uses PyTorch's own operations instead (slower on a CPU)",
                        type(error).__name__,
                        str(error).strip().splitlines()[-1] if str(error).strip() else "",
                    )
    loaded = _loaded[NAME]
    if isinstance(loaded, Exception):
        if required:
            raise RuntimeError(
                f"adapt.lora_kernel=cpp: the C++ kernels of {SOURCE.name} could not be built or loaded: "
                f"{loaded}"
            ) from loaded
        return None
    return loaded


def lays_out(kernel: ModuleType | None, weight: Any) -> bool:
    """Whether `kernel` lays `weight` out for products of its own (cpu.cpp, "Frozen weights through our own
    products"): a CPU with AVX-512 BF16 where oneDNN offers no micro-kernel, and a bf16 weight whose sizes are
    multiples of 16."""
    return (
        kernel is not None
        and kernel.own_frozen_products()
        and str(weight.dtype) == "torch.bfloat16"
        and all(size % 16 == 0 for size in weight.shape)
    )
