"""The pieces of the hypernetwork's exact (batch-invariant) forward: work units of one input each, run on one
intra-op thread apiece.

An input's result is bit-identical whatever it is batched with when every operation it goes through is the
same call, on operands of the same shapes and alignment, computed the same way. "The same way" includes the
threads: a kernel's rounding can depend on how its work is split between threads, and an elementwise kernel
splits its range by thread count. So on a CPU every unit of the exact forward (one input's task code and
trunk; one head product of one input and one column block) runs single-threaded, on a helper thread of its
own, and the batch's units are spread over the helpers (`Helpers.run`). That also keeps the cores busy with
few synchronisations: a batch is two hand-overs to the helpers, not a parallel region per call, which matters
on cores shared with other busy processes (the event loop, the clients, Redis), where every parallel region
waits for its slowest thread. On a GPU the units run in order on the calling thread (each kernel is launched
with the same shapes, and a kernel's threads do not depend on what else is queued).
"""

from __future__ import annotations

import itertools
import os
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor

import torch
from torch import nn

# the head weights are multiplied in column blocks of about this many bytes, which stay in cache while every input
# of the batch uses them (1024 columns at the Mistral dims' head input of 512). Single-threaded on 2 cores of an
# AMD EPYC, 1-4 MiB blocks ran the exact forward at B=16 within 4% of the plain batched one, 8 and 16 MiB 25%
# and 40% slower; with two helpers, 2 MiB blocks ran 10-20% faster than 4 MiB ones at B=16 and 64
EXACT_BLOCK_BYTES = 2 << 20
ALIGN = 64  # bytes: every operand of an input's products starts at such an address, batched or alone


def own(t: torch.Tensor) -> torch.Tensor:
    """`t` contiguous at an ALIGN-byte boundary: where an input's operand sits in memory must not depend on its
    place in a batch (some kernels choose their code path by the alignment of their operands)."""
    t = t.contiguous()
    return t if t.data_ptr() % ALIGN == 0 else t.clone()


def exact_block(linear: nn.Linear, block_bytes: int = EXACT_BLOCK_BYTES) -> int:
    """Output columns per call of an exact head product: on a CPU a block of about `block_bytes` of weights
    (a multiple of 64 columns), elsewhere the whole head in one call per input."""
    n = linear.out_features
    if linear.weight.device.type != "cpu":
        return n
    per_column = linear.in_features * linear.weight.element_size()
    return min(n, max(64, block_bytes // per_column // 64 * 64))


class Helpers:
    """Threads that each run torch on one intra-op thread. `run(units)` calls every unit once, spread over the
    helpers in contiguous runs (so that consecutive units, which share a block of weights, stay on one core),
    and returns when all are done; a unit's exception is raised there."""

    def __init__(self, n: int):
        self.n = n
        self.pool = ThreadPoolExecutor(n, thread_name_prefix="loragen-exact")
        ready = threading.Barrier(n + 1)
        threads = torch.get_num_threads()

        def one_thread() -> None:
            torch.set_num_threads(1)  # this thread's OpenMP and MKL threads (and the default for new threads)
            ready.wait()

        for _ in range(n):  # every helper started and set now, not lazily at some later submit
            self.pool.submit(one_thread)
        ready.wait()
        torch.set_num_threads(threads)  # the default for threads started from now on, and this thread's own

    def run(self, units: Sequence[Callable[[], None]]) -> None:
        k = len(units)
        if k == 0:
            return
        # inference mode and grad mode are per thread: the helpers run under the caller's
        modes = (torch.is_inference_mode_enabled(), torch.is_grad_enabled())
        bounds = [k * t // self.n for t in range(self.n + 1)]
        runs = [units[a:b] for a, b in itertools.pairwise(bounds) if b > a]
        for f in [self.pool.submit(_run_all, r, *modes) for r in runs]:
            f.result()


def _run_all(units: Sequence[Callable[[], None]], inference: bool, grad: bool) -> None:
    with torch.inference_mode(inference), torch.set_grad_enabled(grad):
        for u in units:
            u()


_helpers: Helpers | None = None
_lock = threading.Lock()


def helpers() -> Helpers:
    """This process's helpers, one per intra-op thread torch has when they are first needed."""
    global _helpers
    with _lock:
        if _helpers is None:
            _helpers = Helpers(max(1, torch.get_num_threads()))
        return _helpers


def _forget_helpers() -> None:  # a forked child has none of its parent's threads
    global _helpers, _lock
    _helpers, _lock = None, threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_helpers)


def run_units(units: Sequence[Callable[[], None]], device: torch.device) -> None:
    """Every unit once: on the helpers on a CPU, in order on this thread elsewhere."""
    if device.type == "cpu":
        helpers().run(units)
    else:
        for u in units:
            u()


def exact_latents(first: Callable[[int], torch.Tensor], n: int, device: torch.device) -> list[torch.Tensor]:
    """first(i) for i < n, each a unit of its own: what one input computes before the heads."""
    out: list[torch.Tensor | None] = [None] * n

    def unit(i: int) -> Callable[[], None]:
        def go() -> None:
            out[i] = first(i)
        return go

    run_units([unit(i) for i in range(n)], device)
    return out  # type: ignore[return-value]


def exact_linears(heads: Sequence[tuple[nn.Linear, list[torch.Tensor]]],
                  block_bytes: int = EXACT_BLOCK_BYTES) -> list[torch.Tensor]:
    """Each (linear, xs) applied to each input's rows alone: xs[i] (R, K), the same R for all → (len(xs), R, out).
    Every product is one `addmm` of a fixed shape (R, K) @ (K, block) into its own place of the output: the same
    call for an input whatever the batch. Units are ordered block by block, the inputs inside, so that a block's
    weights stay in cache across the batch."""
    outs, units = [], []
    for linear, xs in heads:
        w, bias = linear.weight, linear.bias  # (out, K), (out,)
        rows, n = xs[0].shape[0], linear.out_features
        out = torch.empty(len(xs), rows, n, dtype=w.dtype, device=w.device)
        block = exact_block(linear, block_bytes)
        xs = [own(x) for x in xs]
        for j in range(0, n, block):
            w_t, b_j = w[j : j + block].t(), bias[j : j + block]  # (K, block) as a transposed view, (block,)
            for i, x in enumerate(xs):
                units.append(_product(b_j, x, w_t, out[i, :, j : j + block]))
        outs.append(out)
    if heads:
        run_units(units, heads[0][0].weight.device)
    return outs


def _product(bias: torch.Tensor, x: torch.Tensor, w_t: torch.Tensor, out: torch.Tensor) -> Callable[[], None]:
    return lambda: torch.addmm(bias, x, w_t, out=out)


def exact_linear(linear: nn.Linear, xs: list[torch.Tensor], block_bytes: int = EXACT_BLOCK_BYTES) -> torch.Tensor:
    """`exact_linears` of one linear."""
    return exact_linears([(linear, xs)], block_bytes)[0]
