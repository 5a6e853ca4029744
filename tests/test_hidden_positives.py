"""Tests for hpseg.hidden_positives: golden parity, an independent per-image reference, chunking,
the sparse path against the dense one, the negative draw, the memory budget, NaN-free edge
cases, bounded memory, LHP and the small helpers."""

from __future__ import annotations

import importlib.util
import logging
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from hpseg.errors import HPSegError
from hpseg.hidden_positives import (
    HiddenPositiveLoss,
    chunk_images_for_budget,
    consistency_loss,
    hidden_positive_loss,
    lambda_schedule,
    local_propagation,
    negative_keys,
    neighbourhood_counts,
    neighbourhood_mask,
    pool_thresholds,
    positive_masks,
    positive_pair_keys,
    sample_pool,
    sample_pool_entries,
)
from hpseg.hidden_positives.budget import DENSE_BYTES_PER_ENTRY
from hpseg.hidden_positives.masks import _positive_entries, threshold_margin
from hpseg.hidden_positives.sparse import BYTES_PER_PAIR
from loss_inputs import clustered_problem, unit

_REF_PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "reference_loss.py"


def _load_reference() -> Any:
    spec = importlib.util.spec_from_file_location("hpseg_bench_reference_loss", _REF_PATH)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


ref = _load_reference()


def _value_and_grads(fn: Any, inputs: dict[str, torch.Tensor], **kwargs: Any) -> tuple[torch.Tensor, ...]:
    z = inputs["z"].clone().requires_grad_(True)
    z_lhp = inputs["z_lhp"].clone().requires_grad_(True)
    rest = [inputs[k] for k in ("feats", "code_ema", "pool_agnostic", "pool_specific")]
    loss = fn(z, z_lhp, *rest, **kwargs)
    loss.backward()
    return loss.detach(), z.grad, z_lhp.grad


def _assert_parity(got: tuple[torch.Tensor, ...], want: tuple[torch.Tensor, ...], rtol: float = 1e-5) -> None:
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=rtol, atol=1e-6 * float(w.abs().max()) + 1e-12)


def _formula_loss(
    z: torch.Tensor,
    z_lhp: torch.Tensor,
    feats: torch.Tensor,
    code_ema: torch.Tensor,
    pool_agnostic: torch.Tensor,
    pool_specific: torch.Tensor,
    *,
    num_images: int,
    tau: float,
    lam: float,
    keep: torch.Tensor,
    reweight: bool = True,
) -> torch.Tensor:
    """docs/method.md §4–5 anchor by anchor, dropped anchors and empty images removed by hand."""
    n = z.shape[0]
    per_image = n // num_images
    not_self = ~torch.eye(n, dtype=torch.bool)

    def positives(x: torch.Tensor, pool: torch.Tensor) -> torch.Tensor:
        r = (x @ pool.t()).max(dim=1).values
        sim = x @ x.t()
        return ((sim > r[:, None]) | (sim > r[None, :])) & not_self

    agnostic, specific = positives(feats, pool_agnostic), positives(code_ema, pool_specific)
    den = (agnostic | keep) & not_self
    w = agnostic.float() + lam * specific.float()
    total = z.new_zeros(())
    for e in (z, z_lhp):
        logits = e @ e.t() / tau
        for b in range(num_images):
            anchors = [i for i in range(b * per_image, (b + 1) * per_image) if bool(agnostic[i].any())]
            if not anchors:
                continue
            mean_pos, weight = [], []
            for i in anchors:
                lse = torch.logsumexp(logits[i][den[i]], dim=0)
                mean_pos.append((w[i] * (logits[i] - lse)).sum() / w[i].sum())
                weight.append(w[i].sum())
            pnm = torch.stack(weight) / torch.stack(weight).mean() if reweight else 1.0
            total = total - (tau / 0.07) * (torch.stack(mean_pos) * pnm).mean()
    return total / num_images / 2


# ------------------------------------------------------------------------------------------
# golden parity (authors' code)
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", ["dense", "sparse"])
@pytest.mark.parametrize("chunk_images", [1, 2, 8])
def test_golden_loss_and_gradients(load_golden: Any, chunk_images: int, path: str) -> None:
    g = load_golden("loss_a.pt")
    got = _value_and_grads(
        hidden_positive_loss,
        g,
        num_images=g["B"],
        tau=g["tau"],
        lam=g["lmbd"],
        rho=g["rho"],
        negative_keep=g["negative_keep"],
        reweight=bool(g["reweighting"]),
        chunk_images=chunk_images,
        path=path,
    )
    torch.testing.assert_close(got[0], g["loss"], rtol=1e-5, atol=1e-8)
    torch.testing.assert_close(got[1], g["grad_z"], rtol=1e-5, atol=1e-8)
    torch.testing.assert_close(got[2], g["grad_z_lhp"], rtol=1e-5, atol=1e-8)


def test_golden_reference_formulation(load_golden: Any) -> None:
    """The benchmark's per-image reference is itself faithful to the authors' code."""
    g = load_golden("loss_a.pt")
    got = _value_and_grads(
        ref.reference_hidden_positive_loss,
        g,
        num_images=g["B"],
        tau=g["tau"],
        lam=g["lmbd"],
        negative_keep=g["negative_keep"],
    )
    _assert_parity(got, (g["loss"], g["grad_z"], g["grad_z_lhp"]))


def test_golden_local_propagation(load_golden: Any) -> None:
    g = load_golden("lhp_a.pt")
    out = local_propagation(g["attn_logits"], g["code"], sigma=g["sigma"])
    torch.testing.assert_close(out, g["code_lhp"], rtol=0, atol=1e-5)


# ------------------------------------------------------------------------------------------
# independent reference and chunking
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("b", "s", "d", "f", "p", "rho", "lam", "reweight", "chunk"),
    [
        (4, 5, 8, 12, 16, 0.3, 0.7, True, 3),
        (2, 7, 16, 8, 4, 1.0, 0.0, False, 1),
        (5, 3, 6, 10, 64, 0.5, 1.3, True, 2),
        (3, 4, 12, 6, 8, 0.02, 0.25, False, 8),
    ],
)
@pytest.mark.parametrize("path", ["dense", "sparse"])
def test_matches_per_image_reference(
    b: int, s: int, d: int, f: int, p: int, rho: float, lam: float, reweight: bool, chunk: int, path: str
) -> None:
    inputs = clustered_problem(b, s, d, f, p, seed=b * 100 + s)
    n = b * s * s
    keep = torch.rand(n, n, generator=torch.Generator().manual_seed(7)) < rho
    kwargs = dict(num_images=b, tau=0.6, lam=lam, negative_keep=keep, reweight=reweight)
    want = _value_and_grads(ref.reference_hidden_positive_loss, inputs, **kwargs)
    assert all(bool(torch.isfinite(t).all()) for t in want)
    got = _value_and_grads(hidden_positive_loss, inputs, chunk_images=chunk, path=path, **kwargs)
    _assert_parity(got, want)


@pytest.mark.parametrize("path", ["dense", "sparse"])
def test_chunked_equals_unchunked(path: str) -> None:
    b, s = 5, 4
    inputs = clustered_problem(b, s, 8, 12, 16, seed=3)
    n = b * s * s
    keep = torch.rand(n, n, generator=torch.Generator().manual_seed(1)) < 0.5
    kwargs = dict(num_images=b, tau=0.8, lam=0.5, negative_keep=keep, path=path)
    full = _value_and_grads(hidden_positive_loss, inputs, chunk_images=b, **kwargs)
    for chunk in (1, 2, 3):
        _assert_parity(_value_and_grads(hidden_positive_loss, inputs, chunk_images=chunk, **kwargs), full)


@pytest.mark.parametrize("path", ["dense", "sparse"])
def test_value_without_grad_and_single_branch_grad(path: str) -> None:
    inputs = clustered_problem(3, 4, 8, 8, 8, seed=5)
    kwargs = dict(num_images=3, tau=0.8, lam=0.5, rho=0.1, path=path, generator=torch.Generator())
    full = _value_and_grads(hidden_positive_loss, inputs, **kwargs)
    rest = [inputs[k] for k in ("feats", "code_ema", "pool_agnostic", "pool_specific")]
    with torch.no_grad():
        value = hidden_positive_loss(
            inputs["z"], inputs["z_lhp"], *rest, **{**kwargs, "generator": torch.Generator()}
        )
    torch.testing.assert_close(value, full[0])
    z = inputs["z"].clone().requires_grad_(True)
    hidden_positive_loss(z, inputs["z_lhp"], *rest, **{**kwargs, "generator": torch.Generator()}).backward()
    torch.testing.assert_close(z.grad, full[1])


# ------------------------------------------------------------------------------------------
# robustness: dropped anchors, empty images, rho = 0
# ------------------------------------------------------------------------------------------


def _isolated_problem(isolated: list[int], b: int = 3, s: int = 3, seed: int = 0) -> dict[str, torch.Tensor]:
    """Patches listed in ``isolated`` have no task-agnostic positive: their features live in
    coordinates no other patch uses and the agnostic pool holds them exactly (r ≈ 1), while the
    other patches' thresholds are ≥ 0 (the pool has entries orthogonal to them)."""
    gen = torch.Generator().manual_seed(seed)
    inputs = clustered_problem(b, s, 8, 8, 6, seed=seed)
    n = b * s * s
    normal = torch.zeros(n, 16)
    normal[:, :8] = inputs["feats"]
    lonely = torch.zeros(len(isolated), 16)
    lonely[:, 8:] = unit(len(isolated), 8, gen=gen)
    normal[isolated] = lonely
    pool = torch.zeros(6, 16)
    pool[:, :8] = unit(6, 8, gen=gen)
    inputs["feats"] = normal
    inputs["pool_agnostic"] = torch.cat([pool, lonely])
    return inputs


def _kept_anchors(inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    r_ag = pool_thresholds(inputs["feats"], inputs["pool_agnostic"])
    r_sp = pool_thresholds(inputs["code_ema"], inputs["pool_specific"])
    n = inputs["feats"].shape[0]
    return positive_masks(inputs["feats"], inputs["code_ema"], r_ag, r_sp, slice(0, n)).kept


@pytest.mark.parametrize("path", ["dense", "sparse"])
def test_dropped_anchor_with_rho_zero_has_finite_gradients(path: str) -> None:
    inputs = _isolated_problem(isolated=[4, 13])
    kept = _kept_anchors(inputs)
    assert not kept[4] and not kept[13] and kept.view(3, -1).any(dim=1).all()
    n = kept.numel()
    no_keep = torch.zeros(n, n, dtype=torch.bool)
    kwargs = dict(num_images=3, tau=0.5, lam=0.5)
    got = _value_and_grads(hidden_positive_loss, inputs, rho=0.0, path=path, **kwargs)  # no explicit keep
    assert all(bool(torch.isfinite(t).all()) for t in got)
    _assert_parity(got, _value_and_grads(_formula_loss, inputs, keep=no_keep, **kwargs))
    # the per-image reference (authors' structure): same value, NaN gradients from log(0)·0
    bad = _value_and_grads(ref.reference_hidden_positive_loss, inputs, negative_keep=no_keep, **kwargs)
    torch.testing.assert_close(bad[0], got[0], rtol=1e-5, atol=0)
    assert torch.isnan(bad[1]).any()
    # giving the dropped anchors any denominator (irrelevant to the loss) makes it finite and equal
    patched = no_keep.clone()
    patched[~kept] = True
    fixed = _value_and_grads(ref.reference_hidden_positive_loss, inputs, negative_keep=patched, **kwargs)
    _assert_parity(got, fixed)


@pytest.mark.parametrize("path", ["dense", "sparse"])
def test_image_without_kept_anchor_contributes_zero(path: str) -> None:
    b, s = 3, 3
    empty_image = list(range(s * s, 2 * s * s))  # image 1: no patch has a positive
    inputs = _isolated_problem(isolated=empty_image, b=b, s=s, seed=2)
    kept = _kept_anchors(inputs).view(b, -1)
    assert not kept[1].any() and kept[0].any() and kept[2].any()
    n = b * s * s
    keep = torch.rand(n, n, generator=torch.Generator().manual_seed(0)) < 0.3
    kwargs = dict(num_images=b, tau=0.7, lam=0.8)
    for chunk in (1, 3):
        got = _value_and_grads(
            hidden_positive_loss, inputs, negative_keep=keep, chunk_images=chunk, path=path, **kwargs
        )
        assert all(bool(torch.isfinite(t).all()) for t in got)
        drawn = _value_and_grads(  # drawn negatives, rho = 0 and rho > 0
            hidden_positive_loss,
            inputs,
            rho=0.0 if chunk == 1 else 0.3,
            chunk_images=chunk,
            path=path,
            **kwargs,
        )
        assert all(bool(torch.isfinite(t).all()) for t in drawn)
        _assert_parity(got, _value_and_grads(_formula_loss, inputs, keep=keep, **kwargs))
    # the authors' structure averages an empty tensor for that image: NaN
    nan = _value_and_grads(ref.reference_hidden_positive_loss, inputs, negative_keep=keep, **kwargs)
    assert torch.isnan(nan[0])


@pytest.mark.parametrize("path", ["dense", "sparse"])
def test_no_kept_anchor_at_all_gives_zero_loss_and_gradient(path: str) -> None:
    b, s = 2, 3
    inputs = _isolated_problem(isolated=list(range(b * s * s)), b=b, s=s)
    loss, gz, gzl = _value_and_grads(
        hidden_positive_loss, inputs, num_images=b, tau=0.8, lam=1.0, rho=0.0, path=path
    )
    assert loss.item() == 0.0 and not gz.any() and not gzl.any()


@pytest.mark.parametrize("path", ["dense", "sparse"])
def test_rho_zero_equals_explicit_empty_keep_and_formula(path: str) -> None:
    inputs = clustered_problem(3, 4, 8, 8, 8, seed=11)
    n = 48
    kwargs = dict(num_images=3, tau=0.6, lam=0.4, path=path)
    drawn = _value_and_grads(hidden_positive_loss, inputs, rho=0.0, **kwargs)
    explicit = torch.zeros(n, n, dtype=torch.bool)
    _assert_parity(drawn, _value_and_grads(hidden_positive_loss, inputs, negative_keep=explicit, **kwargs))
    formula_kwargs = {k: v for k, v in kwargs.items() if k != "path"}
    _assert_parity(drawn, _value_and_grads(_formula_loss, inputs, keep=explicit, **formula_kwargs))


@pytest.mark.parametrize("path", ["dense", "sparse"])
def test_random_negative_keep(path: str) -> None:
    inputs = clustered_problem(3, 4, 8, 8, 8, seed=12)
    n = 48
    kwargs = dict(num_images=3, tau=0.6, lam=0.4, path=path)

    def drawn(rho: float, seed: int, step: int = 0, chunk: int = 2) -> tuple[torch.Tensor, ...]:
        return _value_and_grads(
            hidden_positive_loss, inputs, rho=rho, seed=seed, step=step, chunk_images=chunk, **kwargs
        )

    _assert_parity(drawn(0.3, 5), drawn(0.3, 5))  # a pure function of (seed, step)
    assert not torch.equal(drawn(0.3, 5)[0], drawn(0.3, 6)[0])  # another seed, other negatives
    assert not torch.equal(drawn(0.3, 5, step=0)[0], drawn(0.3, 5, step=1)[0])  # fresh every step
    every = torch.ones(n, n, dtype=torch.bool)
    all_kept = _value_and_grads(hidden_positive_loss, inputs, negative_keep=every, **kwargs)
    _assert_parity(drawn(1.0, 0), all_kept)  # rho = 1: keep everything, no draw
    # the draw: index sets image by image, whatever the chunking; compare with the explicit matrix
    keep = torch.zeros(n * n, dtype=torch.bool)
    for image in range(3):
        rows = slice(16 * image, 16 * (image + 1))
        keys, truncated = negative_keys(rows, 16, n, rho=0.3, seed=9, step=4, device=torch.device("cpu"))
        keep[keys + 16 * image * n] = True
        assert int(truncated) == 0
    explicit = _value_and_grads(hidden_positive_loss, inputs, negative_keep=keep.view(n, n), **kwargs)
    for chunk in (1, 2, 3):
        _assert_parity(drawn(0.3, 9, step=4, chunk=chunk), explicit)


def _sparse_unit(rows: int, width: int, gen: torch.Generator) -> torch.Tensor:
    """Unit rows with four entries ±0.5: every product is a multiple of 0.25, exact in any float."""
    out = torch.zeros(rows, width)
    for i in range(rows):
        idx = torch.randperm(width, generator=gen)[:4]
        out[i, idx] = 0.5 * (torch.randint(2, (4,), generator=gen).float() * 2 - 1)
    return out


def _exact_mask_problem(b: int, s: int, d: int, seed: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    n = b * s * s
    return {
        "z": unit(n, d, gen=gen),
        "z_lhp": unit(n, d, gen=gen),
        "feats": _sparse_unit(n, 6, gen),
        "code_ema": _sparse_unit(n, 6, gen),
        "pool_agnostic": _sparse_unit(5, 6, gen),
        "pool_specific": _sparse_unit(5, 6, gen),
    }


def test_low_precision_products_stay_close() -> None:
    """bfloat16 similarity products (the CUDA fast path's code, run on CPU). Mask inputs are
    exactly representable so the masks agree; only the rounding of z's products differs."""
    inputs = _exact_mask_problem(3, 4, 16, seed=4)
    kwargs = dict(num_images=3, tau=0.6, lam=0.5)
    exact = _value_and_grads(hidden_positive_loss, inputs, **kwargs)
    low = _value_and_grads(hidden_positive_loss, inputs, matmul_dtype=torch.bfloat16, **kwargs)
    torch.testing.assert_close(low[0], exact[0], rtol=5e-3, atol=0)
    for g_low, g in zip(low[1:], exact[1:]):
        assert float((g_low - g).norm() / g.norm()) < 2e-2


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_default_path_matches_cpu() -> None:
    inputs = _exact_mask_problem(4, 5, 32, seed=8)
    kwargs = dict(num_images=4, tau=0.6, lam=0.5, chunk_images=3)
    cpu = _value_and_grads(hidden_positive_loss, inputs, **kwargs)
    cuda = _value_and_grads(hidden_positive_loss, {k: v.cuda() for k, v in inputs.items()}, **kwargs)
    torch.testing.assert_close(cuda[0].cpu(), cpu[0], rtol=5e-3, atol=0)
    for g_gpu, g in zip(cuda[1:], cpu[1:]):
        assert float((g_gpu.cpu() - g).norm() / g.norm()) < 2e-2


def test_enclosing_autocast_does_not_lower_precision(load_golden: Any) -> None:
    g = load_golden("loss_a.pt")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = _value_and_grads(
            hidden_positive_loss,
            g,
            num_images=g["B"],
            tau=g["tau"],
            lam=g["lmbd"],
            negative_keep=g["negative_keep"],
        )
    _assert_parity(got, (g["loss"], g["grad_z"], g["grad_z_lhp"]))


# ------------------------------------------------------------------------------------------
# sparse path == dense path; negatives as index sets; path and chunk choice; statistics
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("b", "s", "p", "rho", "lam", "reweight", "explicit", "chunks"),
    [
        (4, 5, 16, 0.02, 0.0, True, False, (1, 3)),
        (4, 5, 16, 0.1, 0.7, False, False, (2, 4)),
        (3, 6, 8, 0.3, 1.3, True, True, (1, 2)),
        (5, 3, 64, 0.0, 0.5, False, True, (5,)),
        (2, 7, 4, 0.05, 0.25, True, False, (1,)),
    ],
)
def test_sparse_equals_dense(
    b: int, s: int, p: int, rho: float, lam: float, reweight: bool, explicit: bool, chunks: tuple[int, ...]
) -> None:
    """Values and both gradients, drawn (same generator) or explicit negatives, several chunks."""
    inputs = clustered_problem(b, s, 16, 12, p, seed=b * 10 + s)
    n = b * s * s
    kwargs: dict[str, Any] = dict(num_images=b, tau=0.6, lam=lam, reweight=reweight, rho=rho)
    if explicit:
        kwargs["negative_keep"] = torch.rand(n, n, generator=torch.Generator().manual_seed(4)) < rho
    want = _value_and_grads(
        hidden_positive_loss,
        inputs,
        path="dense",
        chunk_images=1,
        generator=torch.Generator().manual_seed(8),
        **kwargs,
    )
    assert all(bool(torch.isfinite(t).all()) for t in want) and want[1].abs().sum() > 0
    for chunk in chunks:
        got = _value_and_grads(
            hidden_positive_loss,
            inputs,
            path="sparse",
            chunk_images=chunk,
            generator=torch.Generator().manual_seed(8),
            **kwargs,
        )
        _assert_parity(got, want)


def test_sparse_transposed_logits_equal_dense(monkeypatch: pytest.MonkeyPatch) -> None:
    """The candidate-by-candidate sampled product and the column-blocked product (used for large
    N) give the same loss and gradients."""
    import hpseg.hidden_positives.sparse as sparse

    inputs = clustered_problem(3, 5, 16, 12, 16, seed=9)
    kwargs: dict[str, Any] = dict(num_images=3, tau=0.6, lam=0.5, rho=0.2)
    want = _value_and_grads(hidden_positive_loss, inputs, path="dense", generator=torch.Generator(), **kwargs)
    monkeypatch.setattr(sparse, "_GATHER_CACHE_BYTES", 0)
    monkeypatch.setattr(sparse, "_SPMM_BLOCK_BYTES", 64 * 16 * 4)  # column blocks of 64 candidates
    got = _value_and_grads(hidden_positive_loss, inputs, path="sparse", generator=torch.Generator(), **kwargs)
    _assert_parity(got, want)


@pytest.mark.parametrize(("n", "width", "p", "tile"), [(150, 12, 16, 7), (200, 5, 3, 64), (64, 8, 256, 200)])
def test_positive_pair_keys_equal_dense_masks(n: int, width: int, p: int, tile: int) -> None:
    """Screened upper-triangle keys == the dense masks (rare, common and near-empty positives;
    widths not a multiple of the screening block)."""
    gen = torch.Generator().manual_seed(n)
    centres = unit(3, width, gen=gen)
    x = F.normalize(
        centres[torch.randint(3, (n,), generator=gen)] + 0.7 * torch.randn(n, width, generator=gen), dim=1
    )
    r = pool_thresholds(x, unit(p, width, gen=gen))
    dense = positive_masks(x, x, r, r, slice(0, n), with_specific=False).agnostic
    keys = positive_pair_keys(x, r, tile_rows=tile)
    assert keys is not None and 0 < keys.numel() < n * n
    assert torch.equal(keys, dense.reshape(-1).nonzero().view(-1))
    assert positive_pair_keys(x, r, tile_rows=tile, max_pairs=keys.numel() // 4) is None
    # the block screening (used off CPU) finds the same entries as NumPy (used on CPU)
    margin = torch.full((n, -(-n // 64) * 64), float("-inf"))
    margin[:, :n] = threshold_margin(x @ x.t(), r, r)
    for screen in (False, True):
        rr, cc = _positive_entries(margin, screen=screen)
        assert torch.equal(rr * n + cc, (margin[:, :n] > 0).reshape(-1).nonzero().view(-1))


def _module_stats(inputs: dict[str, torch.Tensor], b: int, lam: float = 0.5, **kwargs: Any) -> dict[str, Any]:
    module = HiddenPositiveLoss(0.7, kwargs.pop("rho", 0.02), **kwargs)
    rest = [inputs[k] for k in ("z", "z_lhp", "feats", "code_ema", "pool_agnostic", "pool_specific")]
    loss = module(*rest, num_images=b, lam=lam, generator=torch.Generator().manual_seed(1))
    assert loss.dim() == 0 and bool(torch.isfinite(loss))
    return module.stats


def test_automatic_path_choice() -> None:
    inputs = clustered_problem(3, 4, 8, 8, 64, seed=2)
    assert _module_stats(inputs, 3, rho=1.0)["path"] == "dense"  # every negative kept
    assert _module_stats(inputs, 3, rho=0.02)["path"] == "sparse"
    assert _module_stats(inputs, 3, rho=0.02, path="dense")["path"] == "dense"
    # positives everywhere (a pool far from every patch): sparse would be slower, dense is used
    crowded = dict(inputs, pool_agnostic=-inputs["feats"][:1], pool_specific=-inputs["code_ema"][:1])
    stats = _module_stats(crowded, 3, rho=0.02)
    assert stats["path"] == "dense" and stats["positives_per_anchor"] > 0.5 * 47


def test_statistics_match_the_masks() -> None:
    b, s = 3, 5
    inputs = _isolated_problem(isolated=[2, 30], b=b, s=s, seed=4)
    n = b * s * s
    r_ag = pool_thresholds(inputs["feats"], inputs["pool_agnostic"])
    r_sp = pool_thresholds(inputs["code_ema"], inputs["pool_specific"])
    keep = torch.rand(n, n, generator=torch.Generator().manual_seed(2)) < 0.1
    masks = positive_masks(inputs["feats"], inputs["code_ema"], r_ag, r_sp, slice(0, n), keep=keep)
    assert masks.specific is not None
    for path in ("dense", "sparse"):
        module = HiddenPositiveLoss(0.7, 0.1, path=path, chunk_images=2)
        rest = [inputs[k] for k in ("z", "z_lhp", "feats", "code_ema", "pool_agnostic", "pool_specific")]
        module(*rest, num_images=b, lam=0.5, negative_keep=keep)
        st = module.stats
        assert st["path"] == path and st["chunk_images"] == 2
        assert st["positives_per_anchor"] == pytest.approx(float(masks.agnostic.sum()) / n)
        assert st["specific_per_anchor"] == pytest.approx(float(masks.specific.sum()) / n)
        assert st["kept_anchor_fraction"] == pytest.approx(float(masks.kept.sum()) / n)
        assert st["kept_anchor_fraction"] <= (n - 2) / n  # the isolated patches are dropped
        assert st["denominator_fraction"] == pytest.approx(float(masks.denominator.sum()) / n / n)
        assert all(isinstance(v, (float, int, str)) for v in st.values())
        module(*rest, num_images=b, lam=0.0, negative_keep=keep)
        assert module.stats["specific_per_anchor"] == 0.0


def test_memory_budget_sets_the_chunk(caplog: pytest.LogCaptureFixture) -> None:
    n, per_image, b = 50_176, 784, 64
    for path, pairs in (("dense", 0.0), ("sparse", 1100.0)):
        previous = 0
        for gib in (0.05, 0.5, 1.0, 4.0, 1e3):
            budget = gib * 2**30
            chunk = chunk_images_for_budget(
                path, num_images=b, per_image=per_image, n=n, memory_bytes=budget, pairs_per_row=pairs
            )
            assert 1 <= chunk <= b and chunk >= previous
            per_row = n * DENSE_BYTES_PER_ENTRY if path == "dense" else n + pairs * BYTES_PER_PAIR
            if chunk > 1:  # several images only when they fit; one more would not
                assert chunk * per_image * per_row <= budget
            if chunk < b:
                assert (chunk + 1) * per_image * per_row > budget
            previous = chunk
        assert previous == b
    # the loss uses it (and logs its choice once); chunk_images given overrides the budget
    inputs = clustered_problem(6, 6, 8, 8, 8, seed=21)
    caplog.set_level(logging.INFO, logger="hpseg.hidden_positives.budget")
    small = _module_stats(inputs, 6, path="dense", memory_gb=36 * 216 * 20 * 2.5 / 2**30)
    assert small["chunk_images"] == 2
    _module_stats(inputs, 6, path="dense", memory_gb=36 * 216 * 20 * 2.5 / 2**30)
    assert sum("anchor chunk of 2 of 6 images" in rec.getMessage() for rec in caplog.records) == 1
    assert _module_stats(inputs, 6, path="dense", memory_gb=1.0)["chunk_images"] == 6
    assert _module_stats(inputs, 6, path="dense", memory_gb=1e-9, chunk_images=4)["chunk_images"] == 4
    assert _module_stats(inputs, 6, path="sparse", memory_gb=1e-9)["chunk_images"] == 1


def test_sparse_path_memory_stays_below_a_dense_block() -> None:
    """With a small budget the sparse path holds no (chunk·S², N) float block and no N×N matrix.

    (The batch-wide positive lists take ``8·N²·2/P`` bytes, below one image's block when
    ``P > 4B``: here unclustered features, P = 32 > 4·6.)"""
    b, s, p = 6, 6, 32
    n, per_image = b * s * s, s * s
    gen = torch.Generator().manual_seed(5)
    rest = [unit(n, 16, gen=gen), unit(n, 8, gen=gen), unit(p, 16, gen=gen), unit(p, 8, gen=gen)]
    inputs = {"z": unit(n, 8, gen=gen), "z_lhp": unit(n, 8, gen=gen)}
    z = inputs["z"].clone().requires_grad_(True)
    z_lhp = inputs["z_lhp"].clone().requires_grad_(True)
    tracker = _LargestTensor()
    with tracker:
        loss = hidden_positive_loss(
            z, z_lhp, *rest, num_images=b, tau=0.8, lam=0.5, rho=0.05, path="sparse", memory_gb=1e-4
        )
        loss.backward()
    assert tracker.largest < 4 * per_image * n  # less than one image's float32 block
    assert bool(torch.isfinite(z.grad).all()) and z.grad.abs().sum() > 0


# ------------------------------------------------------------------------------------------
# bounded memory
# ------------------------------------------------------------------------------------------


class _LargestTensor(TorchDispatchMode):
    """Records the largest tensor any ATen op produces."""

    def __init__(self) -> None:
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.layout == torch.strided:  # sparse: its parts count
                self.largest = max(self.largest, t.numel() * t.element_size())
        return out


def test_memory_grows_with_chunk_not_with_n_squared() -> None:
    b, s, d = 6, 6, 8
    n, per_image = b * s * s, s * s
    inputs = clustered_problem(b, s, d, 8, 8, seed=21)
    rest = [inputs[k] for k in ("feats", "code_ema", "pool_agnostic", "pool_specific")]
    largest, saved = {}, {}
    for chunk in (1, 2, 3, 6):
        z = inputs["z"].clone().requires_grad_(True)
        z_lhp = inputs["z_lhp"].clone().requires_grad_(True)
        packed: list[int] = []

        def pack(t: torch.Tensor, packed: list[int] = packed) -> torch.Tensor:
            packed.append(t.numel() * t.element_size())
            return t

        tracker = _LargestTensor()
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), tracker:
            loss = hidden_positive_loss(
                z, z_lhp, *rest, num_images=b, tau=0.8, lam=0.5, rho=0.3, chunk_images=chunk, path="dense"
            )
            loss.backward()
        largest[chunk], saved[chunk] = tracker.largest, sum(packed)
    for chunk, size in largest.items():
        assert size <= 4 * chunk * per_image * n  # one float32 (chunk·S², N) block at most
    assert largest[1] < largest[2] < largest[3] < largest[6]
    assert largest[1] * b <= 4 * n * n
    # what autograd keeps between forward and backward: the two (N, D) gradients, whatever the chunking
    assert all(v <= 2 * 4 * n * d for v in saved.values())


# ------------------------------------------------------------------------------------------
# validation
# ------------------------------------------------------------------------------------------


def test_invalid_inputs_raise_hpseg_error() -> None:
    inputs = clustered_problem(2, 3, 8, 8, 8)
    args = [inputs[k] for k in ("z", "z_lhp", "feats", "code_ema", "pool_agnostic", "pool_specific")]
    kw = dict(tau=0.8, lam=0.5)
    with pytest.raises(HPSegError, match="num_images"):
        hidden_positive_loss(*args, num_images=4, **kw)
    bad = list(args)
    bad[1] = args[1][:-1]
    with pytest.raises(HPSegError, match="z_lhp"):
        hidden_positive_loss(*bad, num_images=2, **kw)
    bad = list(args)
    bad[4] = args[4][:, :-1]
    with pytest.raises(HPSegError, match="pool_agnostic"):
        hidden_positive_loss(*bad, num_images=2, **kw)
    with pytest.raises(HPSegError, match="negative_keep"):
        hidden_positive_loss(*args, num_images=2, negative_keep=torch.ones(18, 17, dtype=torch.bool), **kw)
    with pytest.raises(HPSegError, match="rho"):
        hidden_positive_loss(*args, num_images=2, rho=1.5, **kw)
    with pytest.raises(HPSegError, match="lam"):
        hidden_positive_loss(*args, num_images=2, tau=0.8, lam=-1.0)
    with pytest.raises(HPSegError, match="path"):
        hidden_positive_loss(*args, num_images=2, path="fast", **kw)
    with pytest.raises(HPSegError, match="memory_gb"):
        hidden_positive_loss(*args, num_images=2, memory_gb=0.0, **kw)
    with pytest.raises(HPSegError, match="path"):
        HiddenPositiveLoss(0.8, 0.02, path="fast")
    with pytest.raises(HPSegError, match="num_images"):
        HiddenPositiveLoss(0.8, 0.02)(*args, num_images=4, lam=0.5)
    with pytest.raises(HPSegError, match="code"):
        local_propagation(torch.randn(2, 3, 11, 11), torch.randn(2, 4, 3, 3))


# ------------------------------------------------------------------------------------------
# local hidden positives
# ------------------------------------------------------------------------------------------


def test_neighbourhood_mask_and_counts() -> None:
    counts = neighbourhood_counts(4).view(4, 4)
    assert counts[0, 0] == counts[0, 3] == counts[3, 0] == counts[3, 3] == 4
    assert counts[0, 1] == counts[1, 0] == counts[2, 3] == counts[3, 2] == 6
    assert (counts[1:3, 1:3] == 9).all()
    mask = neighbourhood_mask(4)
    assert mask.dtype == torch.bool and torch.equal(mask, mask.t()) and mask.diagonal().all()
    assert torch.equal(mask.sum(dim=1), counts.reshape(-1))
    assert mask[5].nonzero().view(-1).tolist() == [0, 1, 2, 4, 5, 6, 8, 9, 10]


def test_local_propagation_constant_attention_divides_by_existing_cells() -> None:
    """Uniform attention: every weight is σ/S² (exact in float for S = 4, so none falls below the
    row mean); with code = 1 the sum over the existing cells divided by their number (4/6/9) is
    σ/S² everywhere, corners and edges included (dividing by 9 would give 4/9 of it in corners)."""
    b, s, d, sigma = 2, 4, 3, 28.0
    out = local_propagation(torch.zeros(b, 4, 1 + s * s, 1 + s * s), torch.ones(b, d, s, s), sigma=sigma)
    torch.testing.assert_close(out, torch.full((b, d, s, s), sigma / (s * s)))


@pytest.mark.parametrize(("b", "s", "d"), [(2, 4, 5), (1, 7, 3), (3, 2, 4)])
def test_local_propagation_matches_dense_reference(b: int, s: int, d: int) -> None:
    gen = torch.Generator().manual_seed(s)
    attn = torch.randn(b, 3, 1 + s * s, 1 + s * s, generator=gen).requires_grad_(True)
    code = torch.randn(b, d, s, s, generator=gen).requires_grad_(True)
    out = local_propagation(attn, code)
    want = ref.reference_local_propagation(attn.detach(), code.detach())
    torch.testing.assert_close(out, want, rtol=0, atol=1e-5)
    weights = torch.randn(b, d, s, s, generator=gen)
    (out * weights).sum().backward()
    assert attn.grad is None  # the attention is a constant
    code_ref = code.detach().clone().requires_grad_(True)
    (ref.reference_local_propagation(attn.detach(), code_ref) * weights).sum().backward()
    torch.testing.assert_close(code.grad, code_ref.grad, rtol=0, atol=1e-5)


# ------------------------------------------------------------------------------------------
# small helpers
# ------------------------------------------------------------------------------------------


def test_lambda_schedule() -> None:
    assert lambda_schedule(0, 100, 1100) == 0.0
    assert lambda_schedule(100, 100, 1100) == 0.0
    assert lambda_schedule(101, 100, 1100) == pytest.approx(0.001)
    assert lambda_schedule(600, 100, 1100) == pytest.approx(0.5)
    assert lambda_schedule(1100, 100, 1100) == 1.0
    assert lambda_schedule(5, 10, 10) == 0.0 and lambda_schedule(11, 10, 10) == 1.0


def test_consistency_loss_is_mean_pairwise_distance() -> None:
    gen = torch.Generator().manual_seed(0)
    z, z_aug = unit(10, 6, gen=gen), unit(10, 6, gen=gen)
    torch.testing.assert_close(consistency_loss(z, z_aug), torch.nn.PairwiseDistance()(z, z_aug).mean())
    assert consistency_loss(z, z).item() == pytest.approx(6**0.5 * 1e-6, rel=1e-3)
    with pytest.raises(HPSegError):
        consistency_loss(z, z_aug[:5])


def test_pool_thresholds_and_sample_pool_entries() -> None:
    gen = torch.Generator().manual_seed(0)
    x, pool = unit(20, 5, gen=gen), unit(7, 5, gen=gen)
    torch.testing.assert_close(pool_thresholds(x, pool), (x @ pool.t()).max(dim=1).values)
    maps = torch.randn(4, 5, 3, 3, generator=gen)
    entries = sample_pool_entries(maps, generator=torch.Generator().manual_seed(1))
    assert entries.shape == (4, 5)
    torch.testing.assert_close(entries.norm(dim=1), torch.ones(4))
    patches = F.normalize(maps.flatten(2), dim=1)  # (B, C, S²)
    for i in range(4):  # each entry is one of its own image's patches
        assert (patches[i] - entries[i, :, None]).abs().amax(dim=0).min() < 1e-6
    again = sample_pool(maps, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(entries, again)


# ------------------------------------------------------------------------------------------
# the dense chunk through torch.compile (loss.compile=true)
# ------------------------------------------------------------------------------------------


def _dense_with(inputs: dict[str, torch.Tensor], compile_chunks: bool) -> tuple[torch.Tensor, ...]:
    return _value_and_grads(hidden_positive_loss, inputs, num_images=3, tau=0.8, lam=0.5, rho=0.3, path="dense",
                            chunk_images=2, seed=1, step=2, compile_chunks=compile_chunks)


def test_compiled_dense_chunk_is_one_graph_with_the_eager_values(monkeypatch: pytest.MonkeyPatch) -> None:
    """``torch.compile`` traces the dense chunk as one graph (no break: every element-wise pass can
    fuse) and gives the eager values. On CPU the graph runs through AOTAutograd without code
    generation (Inductor's C++ build takes a minute here); on CUDA the test below uses Inductor."""
    import hpseg.hidden_positives.dense as dense
    import hpseg.hidden_positives.loss as loss_module

    inputs = clustered_problem(3, 4, 8, 8, 8, seed=21)
    want = _dense_with(inputs, compile_chunks=False)
    monkeypatch.setattr(loss_module, "compiled_dense_chunk_terms", lambda: dense.compiled_dense_chunk_terms("aot_eager"))
    torch._dynamo.reset()
    _assert_parity(_dense_with(inputs, compile_chunks=True), want)
    # one graph, no break (a break would split the fused kernels on a GPU)
    n, m = 48, 32
    x = inputs
    explained = torch._dynamo.explain(dense.dense_chunk_terms)(
        (x["z"][:m], x["z_lhp"][:m]), (x["z"], x["z_lhp"]), x["feats"][:m], x["feats"], x["code_ema"][:m],
        x["code_ema"], (torch.zeros(m), torch.zeros(m)), (torch.zeros(n), torch.zeros(n)), torch.arange(m),
        torch.zeros(m, n, dtype=torch.bool), images=2, lam=0.5, tau=0.8, reweight=True, dtype=torch.float32,
        need_grad=(True, True), grad_scale=-1.0,
    )
    assert explained.graph_count == 1 and explained.graph_break_count == 0, explained.break_reasons


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: Inductor's fused kernels on a GPU")
def test_compiled_dense_chunk_on_cuda_equals_eager() -> None:
    inputs = {k: v.cuda() for k, v in clustered_problem(3, 4, 8, 8, 8, seed=22).items()}
    want = _dense_with(inputs, compile_chunks=False)
    got = _dense_with(inputs, compile_chunks=True)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-5)
