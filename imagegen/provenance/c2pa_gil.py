"""c2pa-python's signature, run with the GIL held.

c2pa-python's native library reads and writes the image through Python callbacks: per 64 px PNG about
300 reads, 200 seeks and as many writes. ctypes releases the GIL for the native call, so every callback
takes it back; in a process where another Python thread is busy (the other stamp thread, Ray's threads,
a render's Python), each of those waits up to the interpreter's switch interval (5 ms). A 1 ms signature
took 0.36 s next to one busy thread (``bench/stamp_cost.py``: ``sign_busy_ms``). Calling the same native
function through a ``ctypes.PyDLL`` handle keeps the GIL for the whole call (1-3 ms, the image's size
alone), so no callback waits; the library calls back only on the calling thread (its streams, and a
signer built from a key has no callback), so holding the GIL cannot deadlock it.

The change is one attribute: c2pa-python's module-level library handle becomes a proxy that answers
``c2pa_builder_sign`` with the GIL-holding function and everything else with the original handle,
installed once, before the first signer is made. A c2pa-python whose internals differ keeps its own
call (slower under contention, never wrong) and says so once in the log.
"""

from __future__ import annotations

import ctypes
import logging
import threading
from typing import Any

log = logging.getLogger(__name__)

_lock = threading.Lock()


class _SignHoldingGil:
    """c2pa-python's library handle, with ``c2pa_builder_sign`` called without releasing the GIL."""

    def __init__(self, library: Any, sign: Any):
        self.library = library
        self.c2pa_builder_sign = sign

    def __getattr__(self, name: str) -> Any:
        return getattr(self.library, name)


def hold_gil_while_signing() -> bool:
    """Make c2pa-python's signature hold the GIL (idempotent); True when it does."""
    with _lock:
        if signs_holding_gil():
            return True
        try:
            import c2pa.c2pa as binding

            library = binding._lib
            original = library.c2pa_builder_sign
            holding = ctypes.PyDLL(library._name).c2pa_builder_sign
            holding.argtypes, holding.restype = original.argtypes, original.restype
        except (ImportError, AttributeError, OSError) as exc:
            log.warning("c2pa signatures release the GIL (%s): slower when other threads are busy", exc)
            return False
        binding._lib = _SignHoldingGil(library, holding)
        return True


def signs_holding_gil() -> bool:
    """Whether c2pa-python's ``Builder.sign`` now calls its library without releasing the GIL."""
    try:
        import c2pa.c2pa as binding
    except ImportError:
        return False
    sign = getattr(binding._lib, "c2pa_builder_sign", None)
    return bool(getattr(sign, "_flags_", 0) & ctypes._FUNCFLAG_PYTHONAPI)
