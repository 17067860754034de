"""Thread control for the small-operation parts of a merge: numpy's BLAS (OpenBLAS) on one thread."""

from __future__ import annotations

import ctypes
import functools
import glob
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

#: OpenBLAS's thread-count functions, as numpy's own build (scipy-openblas) and a system OpenBLAS
#: name them (the prefixes and suffixes threadpoolctl looks for)
_NAMES = [(f"{prefix}openblas_get_num_threads{suffix}", f"{prefix}openblas_set_num_threads{suffix}")
          for prefix in ("scipy_", "") for suffix in ("64_", "_64", "")]


@contextmanager
def single_threaded() -> Iterator[None]:
    """Run a block with numpy's BLAS on one thread, then restore the caller's setting.

    Used where the work is many small operations: thin QRs (d x R) and tiny SVDs of the factored
    path, and the 1M-entry row blocks of the element-wise methods. Threads do not speed those up, and
    on a busy machine their synchronisation made them 10x slower (measured on 2 loaded cores: numpy's
    QR of 11008 x 32, 44 ms on one thread and 430 ms on two). Large matrix products (the randomized
    SVD) keep the caller's thread count. Where numpy's BLAS is not OpenBLAS, this does nothing.
    """
    control = _openblas()
    if control is None:
        yield
        return
    get, set_ = control
    previous = get()
    set_(1)
    try:
        yield
    finally:
        set_(previous)


@functools.cache
def _openblas() -> tuple[Callable[[], int], Callable[[int], None]] | None:
    import numpy

    wheel_libs = glob.glob(os.path.join(os.path.dirname(numpy.__path__[0]), "numpy.libs", "*openblas*"))
    for path in [*wheel_libs, None]:  # None: the symbols already loaded into the process
        try:
            library = ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL) if path else ctypes.CDLL(None)
        except OSError:
            continue
        for get_name, set_name in _NAMES:
            get, set_ = getattr(library, get_name, None), getattr(library, set_name, None)
            if get is not None and set_ is not None:
                get.restype, set_.argtypes = ctypes.c_int, [ctypes.c_int]
                return _getter(get), _setter(set_)
    return None


def _getter(function: Any) -> Callable[[], int]:
    return lambda: int(function())


def _setter(function: Any) -> Callable[[int], None]:
    return lambda threads: function(threads)
