"""The k x k eigen-solves of a data-aware re-estimate, off the training stream.

`compact_dist.core.basis.top_eigenvectors` turns the reduced sketches S = C Q0 into the next
P. Its cost is latency, not FLOPs: torch loops cusolver's syevd over every matrix of a batch
(k > 32), e.g. 48 x (640 x 640) + 384 smaller ones per estimate at 1.3B, ~1.7 s on an H200
(the step is ~0.18 s), with host syncs for the solver status. `BackgroundEigensolve` runs it
in a worker thread on its own CUDA stream, so training launches its next steps meanwhile and
the device interleaves the two; `result()` joins the thread and orders the training stream
after the solve. The caller decides when to collect (compact_dist.core.subspace:
`estimate_lag` steps later, the same step on every rank), so the switch of P stays
deterministic. Without CUDA it computes at once (nothing to overlap on CPU).

The thread only computes: no collectives (those stay on the main thread, in the same order on
every rank) and no autograd. Sketch sums are read on the side stream after it waits for the
training stream (the data-parallel sum of S was issued there); the bases are produced on the
side stream and `record_stream`-ed on the training stream, which uses and frees them.
"""

from __future__ import annotations

import threading
from typing import Optional

import torch

from compact_dist.core.basis import SubspaceSketch, top_eigenvectors


class BackgroundEigensolve:
    """`top_eigenvectors(sketches)` in a worker thread on a side CUDA stream.

    sketches: closed, already reduced over the data-parallel (and TP) groups; this object
        keeps them alive until `result()`.
    """

    def __init__(self, sketches: list[SubspaceSketch]):
        self._sketches = sketches
        self._bases: Optional[list[Optional[torch.Tensor]]] = None
        self._error: Optional[BaseException] = None
        self._thread: Optional[threading.Thread] = None
        device = next((s.sums.device for s in sketches), torch.device("cpu"))
        if device.type != "cuda":
            self._bases = top_eigenvectors(sketches)
            return
        self._device = device
        self._stream = torch.cuda.Stream(device)
        self._stream.wait_stream(torch.cuda.current_stream(device))
        self._thread = threading.Thread(target=self._run, name="compact-eigensolve",
                                        daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            with torch.cuda.device(self._device), torch.cuda.stream(self._stream):
                self._bases = top_eigenvectors(self._sketches)
        except BaseException as err:  # noqa: BLE001 - re-raised on the caller's thread
            self._error = err

    @property
    def done(self) -> bool:
        return self._thread is None or not self._thread.is_alive()

    def result(self) -> list[Optional[torch.Tensor]]:
        """The bases (one per sketch, None where it saw nothing), usable on the caller's
        current stream; waits for the worker if it is still solving."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None
            if self._error is None:
                current = torch.cuda.current_stream(self._device)
                current.wait_stream(self._stream)
                for basis in self._bases or []:
                    if basis is not None:
                        basis.record_stream(current)
        if self._error is not None:
            raise RuntimeError("the background estimate of the projections failed") \
                from self._error
        self._sketches = []
        return list(self._bases or [])
