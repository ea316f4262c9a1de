"""One CPU thread for many small computations (LFRE's local fits, fine-tuning small graphs)."""

from __future__ import annotations

import contextlib


@contextlib.contextmanager
def one_cpu_thread(device="cpu"):
    """Run torch and BLAS on one thread inside the block when ``device`` is a CPU; restore afterwards.

    Many small problems (LFRE's thousands of (k x D) local fits, the few-atom graphs of
    fine-tuning) gain nothing from threads but synchronisation: on a loaded 2-core machine
    threads made LFRE's fits 10-20x slower and CHGNet's forward and backward passes 5x slower
    (16 structures: 18.7 s with two threads, 3.8 s with one). GPU devices are left alone.

    Parameters
    ----------
    device : str or torch.device
        ``"cpu"``, ``"cuda:0"``, a ``torch.device``...
    """
    if str(getattr(device, "type", device)).split(":")[0] != "cpu":
        yield
        return
    import torch
    from threadpoolctl import threadpool_limits

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with threadpool_limits(1):
            yield
    finally:
        torch.set_num_threads(before)
