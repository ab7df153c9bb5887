"""The k x k eigen-solves of a data-aware re-estimate, off the training stream and the GPU.

`compact_dist.core.basis.top_eigenvectors` turns the reduced sketches S = C Q0 into the next
P. Its cost is latency, not FLOPs: torch loops cusolver's syevd over every matrix of a batch
(k > 32), e.g. 48 x (640 x 640) + 384 smaller ones per estimate at 1.3B, ~1.7 s on an H200
(the step is ~0.18 s), with host syncs for the solver status. Run on a side CUDA stream in a
thread, the same solves still stalled training by ~1.5 s per estimate at 1.3B (H200; most
likely cusolver's internal synchronous copies, which order against the training stream), so
`BackgroundEigensolve` splits the work three ways:
  1. now, on the training stream: the tall products Y = S + nu Q0, Q0^T Y, Y^T Y (chunked
     fp64 GEMMs, ms), copied to pinned host memory; the sketches are freed at once, so the
     estimate holds no GPU memory while it waits (sketches + factors at 1.3B: ~1.2 GB, which
     would otherwise sit on top of the next steps' activation peak);
  2. in a worker thread, on a quarter of the host cores (single-threaded LAPACK calls from a
     small thread pool; the GIL is released inside each op): the k x k Cholesky /
     eigen-solves, giving T (k x r) per block; the GPU is not touched;
  3. at `result()`, on the training stream: P = Y T, re-orthonormalised.
The caller decides when to collect (compact_dist.core.subspace: `estimate_lag` steps later,
the same step on every rank), so the switch of P stays deterministic. Without CUDA all three
run at once. The thread only computes: no collectives (those stay on the main thread, in the
same order on every rank), no autograd, no CUDA calls beyond waiting for step 1's copies.
"""

from __future__ import annotations

import threading
from typing import Optional

import torch

from compact_dist.core.basis import (SubspaceSketch, bases_from_factors, nystrom_factors,
                                     solve_factors, solver_threads)


class BackgroundEigensolve:
    """`top_eigenvectors(sketches)` with its k x k solves in a worker thread on the CPU
    (steps 1-3 of the module docstring).

    sketches: closed, already reduced over the data-parallel (and TP) groups; they are not
        needed after construction (step 1 has read them).
    """

    def __init__(self, sketches: list[SubspaceSketch], threads: Optional[int] = None):
        # a quarter of this process's cores by default: the training thread keeps the rest
        self.threads = threads or max(1, solver_threads() // 4)
        self._count = len(sketches)
        self._bases: Optional[list[Optional[torch.Tensor]]] = None
        self._error: Optional[BaseException] = None
        self._thread: Optional[threading.Thread] = None
        self._device = next((s.sums.device for s in sketches), torch.device("cpu"))
        cuda = self._device.type == "cuda"
        self._groups = nystrom_factors(sketches, host=cuda)
        if not cuda:
            solve_factors(self._groups, self._device)
            self._bases = bases_from_factors(self._groups, self._count, self._device)
            return
        self._copied = torch.cuda.Event()
        self._copied.record(torch.cuda.current_stream(self._device))
        self._thread = threading.Thread(target=self._run, name="compact-eigensolve",
                                        daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            self._copied.synchronize()  # step 1's copies into pinned memory are complete
            solve_factors(self._groups, torch.device("cpu"), self.threads)
        except BaseException as err:  # noqa: BLE001 - re-raised on the caller's thread
            self._error = err

    @property
    def done(self) -> bool:
        return self._thread is None or not self._thread.is_alive()

    def result(self) -> list[Optional[torch.Tensor]]:
        """The bases (one per sketch, None where it saw nothing) on the caller's current
        stream; waits for the worker if it is still solving."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None
            if self._error is None:
                self._bases = bases_from_factors(self._groups, self._count, self._device)
        if self._error is not None:
            raise RuntimeError("the background estimate of the projections failed") \
                from self._error
        self._groups = []
        return list(self._bases or [])
