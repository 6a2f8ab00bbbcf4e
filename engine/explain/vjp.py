"""Choosing the head's VJP strategy by measuring it: ``vjp_strategy="auto"``.

The C one-hot cotangents of a batch go through the head's vector-Jacobian product either all at
once (``vmap``) or one after the other (``loop``). ``vmap`` is the fast choice when every op of
the head has a batching rule. When one has none, vmap runs that op once per cotangent behind a
"performance drop" warning: on the CPU this is the case for the backward of
``scaled_dot_product_attention``, which is in the head of every token model whose target layer is
the last block's pre-attention norm. Whether the rest of the head, still batched, makes vmap the
faster of the two depends on the head, the batch and the machine, so it is measured: once, at
set-up, on the first batch the explainer sees, and kept for the explainer's life. Both strategies
give the same gradients (up to float rounding), so the choice changes only the speed.

On an asynchronous device (CUDA) a call returns once its kernels are queued, so each timed call is
fenced by a device synchronize before the clock starts and before it stops; otherwise the timing
measures launch latency and the choice is noise.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable

import torch

MEASURED = ("vmap", "loop")
LOOP_MARGIN = 0.9  # the loop is taken only when it measures at least 10 % faster than vmap


def run_strategy(strategy: str, vjp_fn: Callable, cot: torch.Tensor) -> torch.Tensor:
    """The head's gradients for every cotangent row of ``cot`` (C, B, N): (C, *A.shape)."""
    if strategy == "vmap":
        (grads,) = torch.vmap(vjp_fn)(cot)
        return grads
    return torch.stack([vjp_fn(cot[c])[0] for c in range(cot.shape[0])])


def device_sync(device: torch.device) -> Callable[[torch.device], None] | None:
    """What waits for ``device`` to finish its queued work; None where ops complete before they return (CPU)."""
    if device.type == "cuda":
        return torch.cuda.synchronize
    if device.type == "mps":
        return lambda _device: torch.mps.synchronize()
    return None


class AutoVjp:
    """``vjp_strategy="auto"``: per number of classes C, measure both strategies on the first call, then use
    vmap unless the loop was at least 10 % faster. ``choices`` maps C to the strategy picked (C = 1 takes
    the loop: nothing to batch). ``sync(device)`` waits for the device around each timed call; by default
    ``device_sync`` of the cotangents' device."""

    def __init__(self, repeats: int = 2, sync: Callable[[torch.device], None] | None = None):
        self.repeats = repeats
        self.sync = sync
        self.choices: dict[int, str] = {}

    def __call__(self, vjp_fn: Callable, cot: torch.Tensor) -> torch.Tensor:
        c = int(cot.shape[0])
        if c < 2:
            self.choices[c] = "loop"
        if c in self.choices:
            return run_strategy(self.choices[c], vjp_fn, cot)
        with warnings.catch_warnings():
            # vmap's "performance drop" warning is what this measurement is about; it says nothing new.
            warnings.filterwarnings("ignore", message="There is a performance drop", category=UserWarning)
            # One untimed call each, then the best of ``repeats`` timed calls, interleaved so that a
            # change in the machine's load hits both alike.
            grads = {s: run_strategy(s, vjp_fn, cot) for s in MEASURED}
            best = dict.fromkeys(MEASURED, float("inf"))
            device = cot.device
            sync = self.sync or device_sync(device) or (lambda _device: None)
            for _ in range(self.repeats):
                for strategy in MEASURED:
                    sync(device)
                    start = time.perf_counter()
                    grads[strategy] = run_strategy(strategy, vjp_fn, cot)
                    sync(device)
                    best[strategy] = min(best[strategy], time.perf_counter() - start)
        # vmap unless the loop is clearly faster: on a loaded machine two close timings are a coin toss,
        # and where the head has every batching rule vmap is the better bet.
        choice = "loop" if best["loop"] < LOOP_MARGIN * best["vmap"] else "vmap"
        self.choices[c] = choice
        return grads[choice]


__all__ = ["LOOP_MARGIN", "MEASURED", "AutoVjp", "device_sync", "run_strategy"]
