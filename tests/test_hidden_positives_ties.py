"""Exact ties in the comparisons of the method, against a plain formulation written here.

The authors' directions: a candidate is a hidden positive when its similarity is *strictly*
above a threshold (``Rpoint_T < output_cossim``, loss.py:215-221), and the local propagation
zeroes attention *strictly* below its row mean (``attn[attn < mean] = 0``,
DinoFeaturizer.py:171). Random inputs (hypothesis, derandomised) with planted exact ties:

* masks: small-integer vectors, so every similarity is an exact integer in float32, and
  thresholds copied from the similarities themselves;
* local propagation: integer attention logits on a 4×4 grid (16 = a power of two) with σ a
  power of two, and rows made constant (every entry *equals* its row mean after the softmax) or
  nearly constant (the quantile clamp flattens them).
"""

from __future__ import annotations

import itertools

import numpy as np
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from hpseg.hidden_positives import local_propagation
from hpseg.hidden_positives.masks import positive_masks, positive_pair_keys
from hpseg.hidden_positives.pools import pool_thresholds

SETTINGS = settings(max_examples=60, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])


@st.composite
def tied_batch(draw: st.DrawFn) -> tuple[np.ndarray, np.ndarray]:
    """Integer vectors ``(N, C)`` and thresholds ``(N,)``, most of them equal to a similarity of their row."""
    n = draw(st.integers(2, 10))
    c = draw(st.integers(1, 4))
    x = np.array(draw(st.lists(st.integers(-2, 2), min_size=n * c, max_size=n * c)), dtype=np.int64).reshape(n, c)
    sim = x @ x.T
    r = np.empty(n, dtype=np.int64)
    for i in range(n):
        if draw(st.booleans()):  # planted tie: the threshold is one of the row's similarities
            r[i] = sim[i, draw(st.integers(0, n - 1))]
        else:
            r[i] = draw(st.integers(-8, 8))
    return x, r


def plain_positives(x: np.ndarray, r: np.ndarray) -> np.ndarray:
    """``j`` is a positive of ``i ≠ j`` iff ``x_i·x_j > r_i`` or ``x_i·x_j > r_j`` (strict)."""
    n = x.shape[0]
    out = np.zeros((n, n), dtype=bool)
    for i, j in itertools.product(range(n), range(n)):
        s = int(x[i] @ x[j])
        out[i, j] = i != j and (s > r[i] or s > r[j])
    return out


@SETTINGS
@given(tied_batch(), tied_batch(), st.data())
def test_positive_masks_with_ties(ag: tuple[np.ndarray, np.ndarray], sp: tuple[np.ndarray, np.ndarray],
                                  data: st.DataObject) -> None:
    (f, r_ag), (s, r_sp) = ag, sp
    n = min(f.shape[0], s.shape[0])
    f, r_ag, s, r_sp = f[:n], r_ag[:n], s[:n], r_sp[:n]
    start = data.draw(st.integers(0, n - 1))
    stop = data.draw(st.integers(start + 1, n))
    keep = torch.from_numpy(np.array(data.draw(st.lists(st.booleans(), min_size=n * n, max_size=n * n)))).view(n, n)
    t = lambda a: torch.from_numpy(a).float()  # noqa: E731
    masks = positive_masks(t(f), t(s), t(r_ag), t(r_sp), slice(start, stop), keep=keep[start:stop],
                           matmul_dtype=torch.float32)
    want_ag, want_sp = plain_positives(f, r_ag)[start:stop], plain_positives(s, r_sp)[start:stop]
    assert np.array_equal(masks.agnostic.numpy(), want_ag)
    assert masks.specific is not None and np.array_equal(masks.specific.numpy(), want_sp)
    assert np.array_equal(masks.kept.numpy(), want_ag.any(axis=1))  # anchors with a task-agnostic positive
    not_self = ~np.eye(n, dtype=bool)[start:stop]
    assert np.array_equal(masks.denominator.numpy(), (want_ag | keep[start:stop].numpy()) & not_self)


@SETTINGS
@given(tied_batch(), st.integers(1, 10))
def test_positive_pair_keys_with_ties(batch: tuple[np.ndarray, np.ndarray], tile: int) -> None:
    x, r = batch
    n = x.shape[0]
    keys = positive_pair_keys(torch.from_numpy(x).float(), torch.from_numpy(r).float(), tile_rows=tile,
                              matmul_dtype=torch.float32)
    assert keys is not None
    want = np.flatnonzero(plain_positives(x, r).reshape(-1))  # row-major i·N + j, sorted
    assert np.array_equal(keys.numpy(), want), (n, tile)


@SETTINGS
@given(tied_batch(), st.integers(1, 6))
def test_pool_thresholds_with_ties(batch: tuple[np.ndarray, np.ndarray], p: int) -> None:
    x, _ = batch
    pool = x[: min(p, x.shape[0])]  # the rows themselves: every row ties with its own entry
    r = pool_thresholds(torch.from_numpy(x).float(), torch.from_numpy(pool).float(), matmul_dtype=torch.float32)
    assert np.array_equal(r.numpy(), (x @ pool.T).max(axis=1).astype(np.float32))


# ------------------------------------------------------------------------------------------
# local propagation
# ------------------------------------------------------------------------------------------

S = 4  # 16 patches: 1/16 and σ/16 are exact


def plain_lhp(logits: np.ndarray, code: np.ndarray, sigma: float) -> tuple[np.ndarray, float]:
    """docs/method.md §6 in float64, patch by patch; also the smallest non-zero distance of an
    attention entry from its row mean (a near tie the two precisions may see differently)."""
    b, d = code.shape[:2]
    attn = logits[:, :, 1:, 1:].mean(axis=1)  # (B, S², S²)
    out = np.zeros_like(code)
    near = np.inf
    for bi, i in itertools.product(range(b), range(S * S)):
        row = attn[bi, i]
        lo, hi = np.quantile(row, 0.1), np.quantile(row, 0.9)  # linear interpolation, as torch
        row = np.clip(row, lo, hi)
        row = np.exp(row - row.max())
        row = row / row.sum() * sigma
        mean = row.mean()
        gaps = np.abs(row - mean)
        if (gaps > 0).any():
            near = min(near, gaps[gaps > 0].min())
        row = np.where(row < mean, 0.0, row)  # strictly below the mean: dropped; equal: kept
        ri, ci = divmod(i, S)
        cells = [(ri + dr, ci + dc) for dr in (-1, 0, 1) for dc in (-1, 0, 1)
                 if 0 <= ri + dr < S and 0 <= ci + dc < S]
        acc = np.zeros(d)
        for rr, cc in cells:
            acc += row[rr * S + cc] * code[bi, :, rr, cc]
        out[bi, :, ri, ci] = acc / len(cells)
    return out, near


@st.composite
def tied_attention(draw: st.DrawFn) -> tuple[np.ndarray, np.ndarray, float]:
    b, heads, d = draw(st.integers(1, 2)), draw(st.sampled_from([1, 2])), draw(st.integers(1, 3))
    t = 1 + S * S
    logits = np.array(draw(st.lists(st.integers(-3, 3), min_size=b * heads * t * t, max_size=b * heads * t * t)),
                      dtype=np.float64).reshape(b, heads, t, t)
    for bi, i in itertools.product(range(b), range(1, t)):
        kind = draw(st.sampled_from(["free", "constant", "flattened"]))
        if kind == "constant":  # every entry ties with the row mean
            logits[bi, :, i, 1:] = draw(st.integers(-3, 3))
        elif kind == "flattened":  # one outlier: the [10 %, 90 %] clamp makes the row constant
            logits[bi, :, i, 1:] = 1.0
            logits[bi, :, i, 1 + draw(st.integers(0, S * S - 1))] = 5.0
    code = np.array(draw(st.lists(st.integers(-4, 4), min_size=b * d * S * S, max_size=b * d * S * S)),
                    dtype=np.float64).reshape(b, d, S, S)
    return logits, code, draw(st.sampled_from([8.0, 16.0, 32.0]))


@SETTINGS
@given(tied_attention())
def test_local_propagation_with_ties(case: tuple[np.ndarray, np.ndarray, float]) -> None:
    logits, code, sigma = case
    want, near = plain_lhp(logits, code, sigma)
    assume(near > 1e-4)  # only planted (exact) ties, no accidental near ones
    got = local_propagation(torch.from_numpy(logits).float(), torch.from_numpy(code).float(), sigma=sigma)
    np.testing.assert_allclose(got.double().numpy(), want, atol=1e-4, rtol=1e-5)


def test_planted_lhp_ties_keep_the_row() -> None:
    """A constant attention row: every entry equals the mean and is kept (``<``, not ``≤``)."""
    logits = np.zeros((1, 1, 1 + S * S, 1 + S * S))
    code = np.arange(S * S, dtype=np.float64).reshape(1, 1, S, S)
    got = local_propagation(torch.from_numpy(logits).float(), torch.from_numpy(code).float(), sigma=16.0)
    want, _ = plain_lhp(logits, code, 16.0)
    assert np.abs(want).sum() > 0
    np.testing.assert_allclose(got.double().numpy(), want, atol=1e-6)
