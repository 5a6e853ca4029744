"""Tests for hpseg.hidden_positives.negatives: the counter-based Bernoulli(ρ) draw of kept negatives
is a pure function of (seed, step, image, anchor, candidate), exactly Bernoulli per pair, the same
for both implementations, chunkings and loss paths, and independent across steps."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from hpseg.hidden_positives import negatives as ng
from hpseg.hidden_positives.negatives import (
    draws_per_image,
    geometric_gaps,
    negative_keep_mask,
    negative_keys,
    step_key,
    uniform53,
)

CPU = torch.device("cpu")


def _splitmix64_reference(key: int, image: int, count: int) -> list[int]:
    """SplitMix64 written out on Python integers (the definition in the module docstring)."""
    mask, gamma = (1 << 64) - 1, 0x9E3779B97F4A7C15

    def mix(z: int) -> int:
        z &= mask
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & mask
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & mask
        return z ^ (z >> 31)

    start = mix(key + gamma * (image + 1))
    return [mix(start + k * gamma) >> 11 for k in range(1, count + 1)]


def test_stream_is_splitmix64_and_both_implementations_agree() -> None:
    key = step_key(seed=3, step=17)
    got = uniform53(key, range(2, 5), 50, CPU)
    for row, image in enumerate(range(2, 5)):
        assert got[row].tolist() == _splitmix64_reference(key, image, 50)
    torch_impl = ng._uniform53_torch(key, range(2, 5), 50, CPU)  # the code that runs on GPUs
    assert torch.equal(got, torch_impl)
    assert 0 <= int(got.min()) and int(got.max()) < 2**53
    assert step_key(3, 17) != step_key(3, 18) and step_key(3, 17) != step_key(4, 17)


@pytest.mark.parametrize("rho", [0.3, 0.02, 1e-4, 2e-7])
def test_geometric_gaps_are_exact_against_the_integer_thresholds(rho: float) -> None:
    longest = 10**9  # long enough that tiny rho's gaps are not all capped
    u = uniform53(step_key(0, 1), range(0, 2), 4000, CPU)
    # planted extremes: 0 (the longest gap) and the largest value (gap 0)
    u[0, :2] = torch.tensor([0, 2**53 - 1])
    g = geometric_gaps(u, rho, longest)
    table = ng._threshold_table_cpu(rho, longest)
    exact = g < table.shape[0] - 1  # inside the table: u < T_g and u ≥ T_{g+1}
    assert bool(exact.any())
    assert bool((u[exact] < table[g[exact]]).all()) and bool((u[exact] >= table[g[exact] + 1]).all())
    assert int(g[0, 1]) == 0 and int(g.max()) <= longest
    torch_impl = ng._gaps_torch(u, table, rho, longest)
    assert torch.equal(g[exact], torch_impl[exact])  # exact: the same on every device
    # beyond a capped table (ρ below ~3.5e-5, gaps over 2^20) the float estimate decides alone:
    # devices may then differ by one position at most
    assert int((g - torch_impl).abs().max()) <= 1
    complete = table.shape[0] < ng._MAX_TABLE
    assert complete == (rho > 3.5e-5) and (not complete or torch.equal(g, torch_impl))
    # E[min(G, L)] = Σ_{g=1..L} P(G ≥ g) = q(1 − q^L)/(1 − q), q = 1 − rho
    q = 1 - rho
    mean = q * (1 - q**longest) / rho
    sample = g.double()[:, 2:]
    sd = min(math.sqrt(q) / rho, longest)  # bounds the standard deviation of the capped gap
    assert abs(float(sample.mean()) - mean) < 6 * sd / math.sqrt(sample.numel())


@pytest.mark.parametrize(("per_image", "n", "rho"), [(16, 48, 0.3), (49, 196, 0.02), (9, 27, 0.9)])
def test_draw_is_bernoulli_per_pair_and_never_the_anchor(per_image: int, n: int, rho: float) -> None:
    images = n // per_image
    rows = slice(0, n)
    counts = torch.zeros(n, n)
    steps = 60
    for step in range(steps):
        keys, truncated = negative_keys(rows, per_image, n, rho=rho, seed=7, step=step, device=CPU)
        assert int(truncated) == 0
        assert bool((keys[1:] > keys[:-1]).all())  # sorted, no duplicates
        r, c = keys // n, keys % n
        assert not bool((r == c).any())  # an anchor is never its own negative
        counts.view(-1)[keys] += 1
    trials_per_step = n * (n - 1)
    total = float(counts.sum())
    mean, sd = steps * trials_per_step * rho, math.sqrt(steps * trials_per_step * rho * (1 - rho))
    assert abs(total - mean) < 5 * sd  # the keep rate is rho (binomial interval)
    off_diagonal = counts[~torch.eye(n, dtype=torch.bool)]
    # every pair is kept about rho·steps times: the spread across pairs is binomial (no pair favoured)
    ratio = float(off_diagonal.var()) / (steps * rho * (1 - rho))
    assert 0.75 < ratio < 1.3
    assert images >= 1 and float(torch.diagonal(counts).sum()) == 0.0


def test_draw_is_independent_across_steps_and_images() -> None:
    per_image, n, rho = 64, 256, 0.1
    a, _ = negative_keys(slice(0, n), per_image, n, rho=rho, seed=1, step=10, device=CPU)
    b, _ = negative_keys(slice(0, n), per_image, n, rho=rho, seed=1, step=11, device=CPU)
    both = np.intersect1d(a.numpy(), b.numpy()).size
    trials = n * (n - 1)
    mean, sd = trials * rho * rho, math.sqrt(trials * rho * rho * (1 - rho * rho))
    assert abs(both - mean) < 5 * sd  # P(kept at both steps) = rho² for independent draws
    # two images of one step do not repeat each other's pattern (relative to their anchors)
    r, c = a // n, a % n
    first = set(((r[r < per_image]) * n + c[r < per_image]).tolist())
    second = set(((r[(r >= per_image) & (r < 2 * per_image)] - per_image) * n
                  + c[(r >= per_image) & (r < 2 * per_image)]).tolist())
    overlap = len(first & second)
    assert overlap < 2 * rho * len(first) + 20


def test_draw_does_not_depend_on_chunking_or_path() -> None:
    per_image, n, rho = 25, 100, 0.2
    whole, _ = negative_keys(slice(0, n), per_image, n, rho=rho, seed=5, step=3, device=CPU)
    parts = []
    for first in range(0, n, 2 * per_image):  # chunks of two images
        rows = slice(first, min(first + 2 * per_image, n))
        keys, _ = negative_keys(rows, per_image, n, rho=rho, seed=5, step=3, device=CPU)
        parts.append(keys + first * n)
        mask, truncated = negative_keep_mask(rows, per_image, n, rho=rho, seed=5, step=3, device=CPU)
        assert mask is not None and int(truncated) == 0
        assert torch.equal(mask.reshape(-1).nonzero().view(-1), keys)  # dense mask == sparse keys
    assert torch.equal(torch.cat(parts), whole)
    # the NumPy implementation (CPU) and the torch one (GPUs) give the same keys
    for use_numpy in (True, False):
        keys, valid, truncated = ng._draw(5, 3, slice(0, n), per_image, n, rho, CPU, use_numpy=use_numpy)
        assert torch.equal(keys[valid], whole) and int(truncated) == 0


def test_edge_cases() -> None:
    keys, _ = negative_keys(slice(0, 12), 4, 12, rho=0.0, seed=0, step=0, device=CPU)
    assert keys.numel() == 0
    mask, _ = negative_keep_mask(slice(0, 12), 4, 12, rho=0.0, seed=0, step=0, device=CPU)
    assert mask is not None and not bool(mask.any())
    everything, _ = negative_keys(slice(3, 5), 1, 6, rho=1.0, seed=0, step=0, device=CPU)
    assert everything.tolist() == [j for j in range(6) if j != 3] + [6 + j for j in range(6) if j != 4]
    assert negative_keep_mask(slice(0, 4), 2, 4, rho=1.0, seed=0, step=0, device=CPU)[0] is None
    # the stream is long enough: mean + 12 standard deviations + 64, never more than the trials
    assert draws_per_image(100, 0.5) == 100
    trials = 784 * 50_175
    assert draws_per_image(trials, 0.02) > trials * 0.02 + 12 * math.sqrt(trials * 0.02)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: the draw on a GPU equals the CPU's")
def test_cuda_draw_equals_cpu() -> None:
    cuda = torch.device("cuda")
    for per_image, n, rho in [(49, 196, 0.02), (784, 3136, 0.02), (16, 48, 0.3)]:
        want, _ = negative_keys(slice(0, n), per_image, n, rho=rho, seed=11, step=9, device=CPU)
        got, truncated = negative_keys(slice(0, n), per_image, n, rho=rho, seed=11, step=9, device=cuda)
        assert torch.equal(got.cpu(), want) and int(truncated) == 0
        mask, _ = negative_keep_mask(slice(0, n), per_image, n, rho=rho, seed=11, step=9, device=cuda)
        assert mask is not None and torch.equal(mask.reshape(-1).nonzero().view(-1).cpu(), want)


@pytest.mark.parametrize("rho", [0.3, 0.02, 1e-3])
def test_gaps_at_the_threshold_boundaries_follow_the_integer_definition(rho: float) -> None:
    """Uniforms planted exactly on, and one below, every threshold ``T_g``: where the floating-point
    logarithm is most likely to round across an integer. ``G`` must be ``#{g ≥ 1 : u < T_g}``."""
    longest = 10**6
    table = ng._threshold_table_cpu(rho, longest)
    inner = table[1:-1]
    u = torch.cat([inner, inner - 1, inner + 1]).unsqueeze(0)
    # the definition: how many thresholds T_1, T_2, … exceed u (a binary search on the table)
    expected = torch.from_numpy(np.searchsorted(-table[1:].numpy(), -u.numpy(), side="left"))
    assert torch.equal(geometric_gaps(u, rho, longest), expected)
    assert torch.equal(ng._gaps_torch(u, table, rho, longest), expected)
