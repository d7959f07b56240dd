"""SEAL: self-adapting language models (README.md)."""

import sys

# Run as `python -m` one of these, the process first restarts with a faster allocator (seal.allocator),
# here, before the module itself imports torch.
PRELOADED_MODULES = ("seal", "seal.train", "seal.bench")

if sys.argv[:1] == ["-m"] and "-m" in sys.orig_argv:
    _module = sys.orig_argv[sys.orig_argv.index("-m") + 1 :][:1]
    if _module and _module[0] in PRELOADED_MODULES:
        from seal.allocator import preload

        preload()
