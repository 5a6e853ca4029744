"""The reference pools' passes: positions from the pools' own generator, drawn on the host and
staged through pinned memory on CUDA (no pageable copy, no wait for the device), and a renewal
after a save/restore of the pools and the global random state reproduces the uninterrupted one."""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator
from types import SimpleNamespace
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from hpseg.hidden_positives import sample_pool_entries
from hpseg.runtime import Runtime
from hpseg.train import ReferencePools

F_WIDTH, D_WIDTH, S = 6, 4, 3


class _EmaHead(nn.Module):
    """Stands for the EMA head: a 1×1 convolution with the head's ``dropout=`` keyword."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.proj = nn.Conv2d(F_WIDTH, D_WIDTH, 1)

    def forward(self, feats: torch.Tensor, dropout: float = 0.0) -> torch.Tensor:
        return F.dropout2d(self.proj(feats), dropout, True)


def _passes(device: torch.device, pin: bool = False) -> Callable[[int], Iterator[dict[str, Any]]]:
    """``k -> batches`` of cached features ``(4, F, S, S)``: the k-th pass, its own order per k."""

    def batches(k: int) -> Iterator[dict[str, Any]]:
        gen = torch.Generator().manual_seed(100 + k)
        for _ in range(3):
            feats = torch.randn(4, F_WIDTH, S, S, generator=gen)
            yield {"feats": feats.pin_memory() if pin else feats.to(device)}

    return batches


def _setup(device: str, dropout: float = 0.1, seed: int = 3) -> tuple[ReferencePools, Any, Runtime]:
    model = SimpleNamespace(ema_head=_EmaHead().to(device), backbone=None)
    return ReferencePools(10, dropout, torch.Generator().manual_seed(seed)), model, Runtime.create(device, "fp32")


def test_pool_positions_come_from_the_generator_stream() -> None:
    """The positions are the generator's next ``randint`` draws (the same stream on every device:
    CPU and CUDA runs pick the same patches, and ``last.pt``'s generator state keeps its format)."""
    x = torch.randn(5, 3, 4, 4)
    rows = sample_pool_entries(x, generator=torch.Generator().manual_seed(9))
    idx = torch.randint(16, (5,), generator=torch.Generator().manual_seed(9))
    torch.testing.assert_close(rows, F.normalize(x.flatten(2)[torch.arange(5), :, idx], dim=1), rtol=0, atol=0)


def test_renewal_after_restoring_the_pools_is_exact() -> None:
    """Build, renew, save (pools + global random state, as ``last.pt``), renew twice; a fresh
    ``ReferencePools`` restored from the save renews to the same bits. Without the saved
    generator state the renewals differ: the positions really come from it."""
    pools, model, runtime = _setup("cpu")
    batches = _passes(runtime.device)
    torch.manual_seed(11)
    pools.build(model, batches, runtime)
    pools.renew_specific(model, batches(1), runtime)
    saved, rng = copy.deepcopy(pools.state_dict()), torch.get_rng_state()
    generator_before = pools.generator.get_state()
    want = []
    for k in (2, 3):
        pools.renew_specific(model, batches(k), runtime)
        want.append(pools.specific.clone())
    assert not torch.equal(pools.generator.get_state(), generator_before)  # renewals draw from it
    assert not torch.equal(want[0], saved["specific"]) and not torch.equal(want[0], want[1])

    def resumed(generator_state: bool) -> list[torch.Tensor]:
        again, _, _ = _setup("cpu", seed=99)  # a new process: another generator until restored
        state = dict(saved) if generator_state else {**saved, "generator": again.generator.get_state()}
        again.load_state_dict(state, runtime.device)
        torch.set_rng_state(rng)
        out = []
        for k in (2, 3):
            again.renew_specific(model, batches(k), runtime)
            out.append(again.specific.clone())
        return out

    assert all(torch.equal(a, b) for a, b in zip(resumed(True), want))
    assert not torch.equal(resumed(False)[0], want[0])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: pinned staging, torch.cuda.set_sync_debug_mode")
def test_pool_pass_does_not_synchronise_on_cuda() -> None:
    """A pool pass on CUDA over pinned batches (as the loader gives them) never makes the host
    wait for the device (``set_sync_debug_mode("error")`` raises on a pageable or blocking copy),
    and picks the CPU run's patches (no dropout: the values equal up to rounding)."""
    pools, model, runtime = _setup("cuda", dropout=0.0)
    batches = _passes(runtime.device, pin=True)
    pools.build(model, batches, runtime)  # warm-up: the pinned host allocator and kernels
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        pools.renew_specific(model, batches(1), runtime)
        agnostic = pools.collect(model, batches(2), runtime, "agnostic")
    finally:
        torch.cuda.set_sync_debug_mode(0)
    cpu_pools, cpu_model, cpu_runtime = _setup("cpu", dropout=0.0)
    cpu_batches = _passes(cpu_runtime.device)
    cpu_pools.build(cpu_model, cpu_batches, cpu_runtime)
    cpu_pools.renew_specific(cpu_model, cpu_batches(1), cpu_runtime)
    torch.testing.assert_close(pools.specific.cpu(), cpu_pools.specific, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(agnostic.cpu(), cpu_pools.collect(cpu_model, cpu_batches(2), cpu_runtime, "agnostic"),
                               rtol=1e-4, atol=1e-5)
