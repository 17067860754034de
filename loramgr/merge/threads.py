"""Thread control for the small-operation parts of a merge."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch


@contextmanager
def single_threaded() -> Iterator[None]:
    """Run a block on one intra-op thread, then restore the caller's setting.

    Used where the work is many small operations: thin QRs (d x R) and tiny SVDs of the factored
    path, and the 1M-entry row blocks of the element-wise methods. Threads do not speed those up,
    and on a busy machine OpenMP's synchronisation made them 4-10x slower (measured on 2 cores under
    load: QR of 11008 x 32, 3.7 ms on one thread and 33 ms on two; TIES on one Llama-7B layer,
    14 s on one thread and 58 s on two). Large matrix products (the randomized SVD) keep the
    caller's thread count.
    """
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)
