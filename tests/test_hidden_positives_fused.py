"""Tests for the fused path of the HP loss (hpseg.hidden_positives.fused): its Triton kernels run in
Triton's interpreter on CPU tensors (``TRITON_INTERPRET=1``) and are held to the dense path — loss,
statistics and both branches' gradients in float32 and with float16 operands — over λ, ρ,
reweighting, dropped anchors, empty images, odd N, paper widths, explicit keep masks and anchor
row ranges; the kept negatives bit for bit against the NumPy draw; two runs bit for bit; and the
one-line error when the path cannot run. (bf16 ``tl.dot`` is wrong in the interpreter: GPU only.)"""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path
from typing import Any

import pytest
import torch

from hpseg.config import build_config
from hpseg.errors import HPSegError
from hpseg.hidden_positives import HiddenPositiveLoss, fused, hidden_positive_loss
from hpseg.hidden_positives.budget import chunk_images_for_budget, resolve_path
from hpseg.hidden_positives.dense import dense_chunk_terms
from hpseg.hidden_positives.negatives import negative_keep_mask
from hpseg.hidden_positives.pools import pool_thresholds
from loss_inputs import clustered_problem, unit

CPU = torch.device("cpu")
HAS_TRITON = importlib.util.find_spec("triton") is not None
needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed (the fused path needs it)")
#: Small tiles: many programs and tiles on small problems, N never a multiple of them.
SMALL = fused.FusedTiles(rows=32, cols=32, depth=16, warps=4, grad_rows=32, grad_cols=64, grad_warps=4, draws=64)


@pytest.fixture
def interpret(monkeypatch: pytest.MonkeyPatch) -> None:
    """Run the Triton kernels in the interpreter (read when the kernels are built: fused._kernels).

    Triton's own library follows ``TRITON_INTERPRET`` as it was when triton was first imported
    (``tests/conftest.py`` sets it without a GPU). On a GPU machine it is compiled: there the CUDA
    tests below check the kernels, and these interpreter tests are skipped.
    """
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    if HAS_TRITON and not fused._library_interpreted():
        if torch.cuda.is_available():
            pytest.skip("triton was imported compiled for the GPU: the CUDA tests check the kernels here")
        pytest.fail("TRITON_INTERPRET=1 must be set before triton is imported (tests/conftest.py does it)")


def _exact_problem(b: int, s: int, d: int, seed: int) -> dict[str, torch.Tensor]:
    """Mask inputs whose products are multiples of 0.25 (exact in float16): identical masks in any dtype."""
    gen = torch.Generator().manual_seed(seed)
    n = b * s * s

    def sparse_unit(rows: int) -> torch.Tensor:
        out = torch.zeros(rows, 8)
        for i in range(rows):
            out[i, torch.randperm(8, generator=gen)[:4]] = 0.5 * (torch.randint(2, (4,), generator=gen) * 2 - 1.0)
        return out

    return {"z": unit(n, d, gen=gen), "z_lhp": unit(n, d, gen=gen), "feats": sparse_unit(n),
            "code_ema": sparse_unit(n), "pool_agnostic": sparse_unit(5), "pool_specific": sparse_unit(5)}


def _isolated(inputs: dict[str, torch.Tensor], isolated: list[int], seed: int = 0) -> dict[str, torch.Tensor]:
    """Patches in ``isolated`` get features nobody shares, held exactly by the pool: no positive."""
    gen = torch.Generator().manual_seed(seed)
    n, f = inputs["feats"].shape
    feats = torch.zeros(n, 2 * f)
    feats[:, :f] = inputs["feats"]
    lonely = torch.zeros(len(isolated), 2 * f)
    lonely[:, f:] = unit(len(isolated), f, gen=gen)
    feats[isolated] = lonely
    pool = torch.zeros(inputs["pool_agnostic"].shape[0], 2 * f)
    pool[:, :f] = inputs["pool_agnostic"]
    return dict(inputs, feats=feats, pool_agnostic=torch.cat([pool, lonely]))


def _run(inputs: dict[str, torch.Tensor], path: str, **kwargs: Any) -> tuple[tuple[torch.Tensor, ...], dict]:
    """Loss, ∂/∂z, ∂/∂z_lhp and the module's statistics."""
    module = HiddenPositiveLoss(kwargs.pop("tau", 0.7), kwargs.pop("rho", 1.0), path=path,
                                reweight=kwargs.pop("reweight", True), chunk_images=kwargs.pop("chunk_images", None),
                                matmul_dtype=kwargs.pop("matmul_dtype", None), seed=kwargs.pop("seed", 3))
    z = inputs["z"].clone().requires_grad_(True)
    z_lhp = inputs["z_lhp"].clone().requires_grad_(True)
    rest = [inputs[k] for k in ("feats", "code_ema", "pool_agnostic", "pool_specific")]
    loss = module(z, z_lhp, *rest, **kwargs)
    loss.backward()
    assert z.grad is not None and z_lhp.grad is not None
    return (loss.detach(), z.grad, z_lhp.grad), module.stats


def _assert_close(got: tuple[torch.Tensor, ...], want: tuple[torch.Tensor, ...], rtol: float) -> None:
    """Loss within ``rtol`` relative; each gradient within ``rtol`` of its largest entry."""
    assert all(bool(torch.isfinite(t).all()) for t in got)
    torch.testing.assert_close(got[0], want[0], rtol=rtol, atol=1e-30)
    for g, w in zip(got[1:], want[1:]):
        assert float((g - w).abs().max()) <= rtol * float(w.abs().max()) + 1e-30


def _same_stats(got: dict, want: dict) -> None:
    assert got["path"] == "fused" and want["path"] == "dense"
    for key in ("positives_per_anchor", "specific_per_anchor", "kept_anchor_fraction", "denominator_fraction",
                "negative_draw_truncated"):
        assert got[key] == want[key], key


# ------------------------------------------------------------------------------------------
# fused against dense, float32
# ------------------------------------------------------------------------------------------


@needs_triton
@pytest.mark.parametrize(
    ("b", "s", "d", "f", "rho", "lam", "reweight"),
    [
        (4, 5, 16, 24, 0.3, 0.5, True),  # N 100: drawn negatives, λ > 0
        (2, 7, 8, 12, 1.0, 0.0, False),  # N 98: every negative kept, λ = 0, no reweighting
        (3, 9, 16, 8, 0.1, 1.3, False),  # N 243: odd, λ > 1
        (8, 8, 16, 24, 0.05, 0.7, True),  # N 512
    ],
)
def test_fused_equals_dense(interpret: None, b: int, s: int, d: int, f: int, rho: float, lam: float,
                            reweight: bool) -> None:
    inputs = clustered_problem(b, s, d, f, 8, seed=b * 10 + s)
    kwargs = dict(num_images=b, lam=lam, rho=rho, reweight=reweight, step=5)
    got, got_stats = _run(inputs, "fused", **kwargs)
    want, want_stats = _run(inputs, "dense", **kwargs)
    _assert_close(got, want, rtol=1e-6)
    _same_stats(got_stats, want_stats)
    assert got_stats["positives_per_anchor"] > 0 and (lam == 0) == (got_stats["specific_per_anchor"] == 0)


@needs_triton
def test_golden_loss_and_gradients(interpret: None, load_golden: Any) -> None:
    """The authors' recorded loss and gradients (tests/golden/loss_a.pt, N 108, explicit keep)."""
    g = load_golden("loss_a.pt")
    (loss, gz, gzl), stats = _run(g, "fused", num_images=g["B"], tau=g["tau"], lam=g["lmbd"], rho=g["rho"],
                                  negative_keep=g["negative_keep"], reweight=bool(g["reweighting"]))
    assert stats["path"] == "fused"
    torch.testing.assert_close(loss, g["loss"], rtol=1e-5, atol=1e-8)
    torch.testing.assert_close(gz, g["grad_z"], rtol=1e-5, atol=1e-8)
    torch.testing.assert_close(gzl, g["grad_z_lhp"], rtol=1e-5, atol=1e-8)


@needs_triton
def test_explicit_keep_small_tiles_and_paper_widths(interpret: None, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(fused, "INTERPRETER_TILES", SMALL)  # 32 × 32 tiles, 16-wide slices, N = 75
    inputs = clustered_problem(3, 5, 24, 20, 6, seed=1)
    keep = torch.rand(75, 75, generator=torch.Generator().manual_seed(4)) < 0.4
    keep.fill_diagonal_(True)  # the anchor itself must stay out of its denominator
    kwargs = dict(num_images=3, lam=0.25, negative_keep=keep)
    got, got_stats = _run(inputs, "fused", **kwargs)
    want, want_stats = _run(inputs, "dense", **kwargs)
    _assert_close(got, want, rtol=1e-6)
    _same_stats(got_stats, want_stats)
    monkeypatch.undo()
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    paper = clustered_problem(2, 6, 512, 384, 16, seed=2)  # F 384, D = D' 512, N 72
    kwargs = dict(num_images=2, lam=0.5, rho=0.2, tau=0.8)
    got, got_stats = _run(paper, "fused", **kwargs)
    want, want_stats = _run(paper, "dense", **kwargs)
    _assert_close(got, want, rtol=1e-6)
    _same_stats(got_stats, want_stats)


@needs_triton
def test_dropped_anchors_and_an_image_without_kept_anchor(interpret: None) -> None:
    b, s = 3, 4
    per_image = s * s
    empty_image = list(range(per_image, 2 * per_image))  # image 1: no patch has a positive
    inputs = _isolated(clustered_problem(b, s, 8, 8, 6, seed=7), isolated=[3, 40, *empty_image])
    for rho, chunk in ((0.0, None), (0.3, 1)):
        kwargs = dict(num_images=b, lam=0.8, rho=rho, chunk_images=chunk, tau=0.6)
        got, got_stats = _run(inputs, "fused", **kwargs)
        want, want_stats = _run(inputs, "dense", **kwargs)
        assert got_stats["kept_anchor_fraction"] <= (b * per_image - per_image - 2) / (b * per_image)
        _assert_close(got, want, rtol=1e-6)
        _same_stats(got_stats, want_stats)
    alone = _isolated(clustered_problem(2, 3, 8, 8, 6), isolated=list(range(18)))  # no kept anchor at all
    (loss, gz, gzl), _ = _run(alone, "fused", num_images=2, lam=1.0, rho=0.0)
    assert loss.item() == 0.0 and not gz.any() and not gzl.any()


@needs_triton
def test_anchor_row_range_equals_dense_on_the_same_rows(interpret: None) -> None:
    """Anchors ⊂ candidates (images 1–2 of 4, the multi-GPU "global candidates" form): the sum, counts
    and the gradient over all candidate rows equal the dense chunk's."""
    b, s = 4, 5
    per_image, n = s * s, b * s * s
    inputs = clustered_problem(b, s, 16, 12, 8, seed=9)
    f, code = inputs["feats"], inputs["code_ema"]
    r = (pool_thresholds(f, inputs["pool_agnostic"]), pool_thresholds(code, inputs["pool_specific"]))
    rows = slice(per_image, 3 * per_image)
    keep, _ = negative_keep_mask(rows, per_image, n, rho=0.3, seed=1, step=2, device=CPU)
    assert keep is not None
    emb = (inputs["z"], inputs["z_lhp"])
    options = dict(images=2, lam=0.5, tau=0.7, reweight=True, dtype=torch.float32, need_grad=(True, True),
                   grad_scale=-0.3)
    total, counts, grads = fused.fused_chunk_terms(rows, emb, f, code, r, fused.keep_bits_from_mask(keep),
                                                   tiles=SMALL, **options)
    want_total, want_counts, want_grads = dense_chunk_terms(
        (emb[0][rows], emb[1][rows]), emb, f[rows], f, code[rows], code, (r[0][rows], r[1][rows]), r,
        torch.arange(rows.start, rows.stop), keep, **options)
    torch.testing.assert_close(total, want_total, rtol=1e-6, atol=0)
    assert torch.equal(counts, want_counts)
    for got, want in zip(grads, want_grads):
        assert got is not None and want is not None
        full = want[1].clone()
        full[rows] += want[0]
        assert float((got - full).abs().max()) <= 1e-6 * float(full.abs().max())
        assert got[: per_image].abs().sum() > 0  # candidates outside the range get their (transposed) term


# ------------------------------------------------------------------------------------------
# float16 operands
# ------------------------------------------------------------------------------------------


@needs_triton
def test_float16_operands_give_the_same_masks_and_close_values(interpret: None) -> None:
    inputs = _exact_problem(4, 5, 32, seed=8)
    kwargs = dict(num_images=4, lam=0.5, rho=0.2, tau=0.6)
    got, got_stats = _run(inputs, "fused", matmul_dtype=torch.float16, **kwargs)
    want, want_stats = _run(inputs, "dense", matmul_dtype=torch.float16, **kwargs)
    exact, _ = _run(inputs, "dense", matmul_dtype=torch.float32, **kwargs)
    _same_stats(got_stats, want_stats)  # identical masks, counts and negatives
    torch.testing.assert_close(got[0], want[0], rtol=2e-3, atol=0)
    for g, w, x in zip(got[1:], want[1:], exact[1:]):
        assert float((g - w).norm() / w.norm()) < 1e-2
        # fp16 with a power-of-two scale is at least as close to float32 as dense's bf16 product
        assert float((g - x).norm() / x.norm()) <= float((w - x).norm() / x.norm())


@needs_triton
def test_tiny_float16_gradient_coefficients_are_not_flushed(interpret: None) -> None:
    """With a gradient scale of 1e-6 every ``G`` entry lies far below fp16's smallest subnormal: the
    power-of-two scale must keep them (unscaled fp16 products would return zeros)."""
    inputs = clustered_problem(2, 5, 16, 12, 6, seed=4)
    f, code = inputs["feats"], inputs["code_ema"]
    r = (pool_thresholds(f, inputs["pool_agnostic"]), pool_thresholds(code, inputs["pool_specific"]))
    emb = (inputs["z"], inputs["z_lhp"])
    rows = slice(0, 50)
    keep = fused.KeepBits(fused.KEEP_ALL)
    options = dict(images=2, lam=0.5, tau=0.7, reweight=True, need_grad=(True, False), grad_scale=1e-6)
    _, _, (g16, none) = fused.fused_chunk_terms(rows, emb, f, code, r, keep, dtype=torch.float16, **options)
    _, _, (g32, _) = fused.fused_chunk_terms(rows, emb, f, code, r, keep, dtype=torch.float32, **options)
    assert none is None and g16 is not None and g32 is not None
    assert float(g32.abs().max()) < 1e-7  # far below fp16's normal range (6e-5)
    assert float((g16 - g32).norm() / g32.norm()) < 5e-3


# ------------------------------------------------------------------------------------------
# negatives, bits, determinism
# ------------------------------------------------------------------------------------------


@needs_triton
@pytest.mark.parametrize(
    ("rows", "per_image", "n", "rho", "seed", "step", "draws"),
    [
        (slice(0, 75), 25, 75, 0.3, 1, 2, 64),  # many blocks per image: the prefix over blocks
        (slice(49, 147), 49, 245, 0.02, 7, 1000, 4096),  # a chunk that does not start at 0
        (slice(0, 64), 16, 64, 0.9, 2**40 + 3, 2**33, 128),  # dense draws, large seed and step
        (slice(36, 72), 36, 108, 0.001, 5, 0, 64),  # rare draws: long gaps
    ],
)
def test_negative_bits_equal_the_numpy_draw(interpret: None, rows: slice, per_image: int, n: int, rho: float,
                                             seed: int, step: int, draws: int) -> None:
    tiles = fused.FusedTiles(draws=draws)
    keep, truncated = fused.draw_keep_bits(rows, per_image, n, rho=rho, seed=seed, step=step, device=CPU,
                                           tiles=tiles)
    want, want_truncated = negative_keep_mask(rows, per_image, n, rho=rho, seed=seed, step=step, device=CPU)
    assert keep.mode == fused.KEEP_BITS and keep.bits is not None and want is not None
    assert keep.bits.shape == (rows.stop - rows.start, -(-n // 32))
    assert torch.equal(fused.unpack_bits(keep.bits, n), want)
    assert int(truncated) == int(want_truncated) == 0
    assert not fused.unpack_bits(keep.bits, 32 * keep.bits.shape[1])[:, n:].any()  # no bit past column N


def test_kernels_use_no_float_atomics() -> None:
    """Bitwise determinism: the only atomic in the kernels is the integer OR of the negatives' bits."""
    source = (Path(fused.__file__).parent / "fused_kernels.py").read_text()
    atomics = set(re.findall(r"tl\.(atomic_\w+)", source))
    assert atomics == {"atomic_or"}
    assert source.count("tl.atomic_or(") == 1 and "bits_ptr + word, 1 <<" in source


def test_pack_and_unpack_bits_and_keep_modes() -> None:
    mask = torch.rand(5, 70, generator=torch.Generator().manual_seed(0)) < 0.5
    mask[:, 31] = True  # the sign bit of the first word
    bits = fused.pack_bits(mask)
    assert bits.dtype == torch.int32 and bits.shape == (5, 3) and bool((bits[:, 0] < 0).all())
    assert torch.equal(fused.unpack_bits(bits, 70), mask)
    assert fused.keep_bits_from_mask(None).mode == fused.KEEP_ALL
    assert fused.draw_keep_bits(slice(0, 4), 4, 8, rho=1.0, seed=0, step=0, device=CPU)[0].mode == fused.KEEP_ALL
    assert fused.draw_keep_bits(slice(0, 4), 4, 8, rho=0.0, seed=0, step=0, device=CPU)[0].mode == fused.KEEP_NONE


@needs_triton
def test_value_without_grad_and_a_single_branch_gradient(interpret: None) -> None:
    """No gradient wanted: pass 1 alone (no bits stored); one branch: pass 2 for that branch only."""
    inputs = clustered_problem(2, 6, 16, 12, 8, seed=8)
    kwargs = dict(num_images=2, tau=0.7, lam=0.5, rho=0.3, path="fused", step=4, seed=3)
    (loss, gz, gzl), _ = _run(inputs, **dict(kwargs))
    rest = [inputs[k] for k in ("feats", "code_ema", "pool_agnostic", "pool_specific")]
    with torch.no_grad():
        value = hidden_positive_loss(inputs["z"], inputs["z_lhp"], *rest, **kwargs)
    assert torch.equal(value, loss)
    z_lhp = inputs["z_lhp"].clone().requires_grad_(True)
    hidden_positive_loss(inputs["z"], z_lhp, *rest, **kwargs).backward()
    assert z_lhp.grad is not None and torch.equal(z_lhp.grad, gzl)


@needs_triton
def test_two_runs_give_identical_bits(interpret: None) -> None:
    inputs = clustered_problem(3, 5, 16, 12, 8, seed=6)
    kwargs = dict(num_images=3, lam=0.5, rho=0.2, step=11)
    first, _ = _run(inputs, "fused", **kwargs)
    second, _ = _run(inputs, "fused", **kwargs)
    for a, b in zip(first, second):
        assert torch.equal(a, b)
    other, _ = _run(inputs, "fused", **{**kwargs, "step": 12})  # another step: other negatives
    assert not torch.equal(other[0], first[0])


@needs_triton
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (the compiled kernels)")
def test_cuda_fused_equals_dense_and_repeats_bitwise(monkeypatch: pytest.MonkeyPatch) -> None:
    """On a GPU, compiled (not interpreted): fp16 (default), bf16 and fp32 operands against dense,
    identical masks on exact mask inputs, two runs bit for bit, and a larger drawn-negatives batch."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    inputs = {k: v.cuda() for k, v in _exact_problem(6, 7, 64, seed=3).items()}
    kwargs = dict(num_images=6, lam=0.5, rho=0.1, tau=0.8, step=7)
    for dtype, rtol, grad_rtol in ((None, 2e-3, 1e-2), (torch.bfloat16, 1e-2, 3e-2), (torch.float32, 1e-5, 1e-5)):
        got, got_stats = _run(inputs, "fused", matmul_dtype=dtype, **kwargs)
        want, want_stats = _run(inputs, "dense", matmul_dtype=dtype, **kwargs)
        _same_stats(got_stats, want_stats)
        torch.testing.assert_close(got[0], want[0], rtol=rtol, atol=0)
        for g, w in zip(got[1:], want[1:]):
            assert float((g - w).norm() / w.norm()) < grad_rtol
        again, _ = _run(inputs, "fused", matmul_dtype=dtype, **kwargs)
        assert all(torch.equal(a, b) for a, b in zip(got, again))
    large = {k: v.cuda() for k, v in clustered_problem(8, 28, 512, 384, 256, seed=5).items()}  # N 6,272, paper widths
    kwargs = dict(num_images=8, lam=0.5, rho=0.02, tau=0.8, step=3)
    got, got_stats = _run(large, "fused", **kwargs)
    want, want_stats = _run(large, "dense", **kwargs)
    torch.testing.assert_close(got[0], want[0], rtol=5e-3, atol=0)
    for g, w in zip(got[1:], want[1:]):
        assert float((g - w).norm() / w.norm()) < 2e-2
    for key in ("positives_per_anchor", "specific_per_anchor", "kept_anchor_fraction", "denominator_fraction"):
        assert got_stats[key] == pytest.approx(want_stats[key], rel=1e-3), key


# ------------------------------------------------------------------------------------------
# availability and options
# ------------------------------------------------------------------------------------------


def test_fused_path_without_interpreter_or_cuda_raises_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    inputs = clustered_problem(2, 3, 8, 8, 4)
    rest = [inputs[k] for k in ("z", "z_lhp", "feats", "code_ema", "pool_agnostic", "pool_specific")]
    with pytest.raises(HPSegError) as exc:
        hidden_positive_loss(*rest, num_images=2, tau=0.7, lam=0.5, path="fused")
    message = str(exc.value)
    assert "\n" not in message and "loss.path=dense" in message and "TRITON_INTERPRET=1" in message
    assert ("triton is not installed" if not HAS_TRITON else "CUDA") in message
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "triton" else real_find_spec(name, *a))
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    with pytest.raises(HPSegError, match="triton is not installed.*loss.path=dense"):
        hidden_positive_loss(*rest, num_images=2, tau=0.7, lam=0.5, path="fused")


@needs_triton
def test_bfloat16_is_refused_in_the_interpreter(interpret: None) -> None:
    inputs = clustered_problem(2, 3, 8, 8, 4)
    rest = [inputs[k] for k in ("z", "z_lhp", "feats", "code_ema", "pool_agnostic", "pool_specific")]
    with pytest.raises(HPSegError, match="bfloat16.*interpreter"):
        hidden_positive_loss(*rest, num_images=2, tau=0.7, lam=0.5, path="fused", matmul_dtype=torch.bfloat16)


@needs_triton
def test_kernels_follow_the_interpreter_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert type(fused._kernels().rows_kernel).__name__ == "InterpretedFunction"
    monkeypatch.delenv("TRITON_INTERPRET")
    assert type(fused._kernels().rows_kernel).__name__ == "JITFunction"


def test_auto_never_picks_fused_and_config_accepts_it() -> None:
    for device in (CPU, torch.device("cuda")):
        for rho in (0.02, 1.0):
            assert resolve_path("auto", rho, None, device) != "fused"
    assert resolve_path("fused", 0.02, None, CPU) == "fused"
    assert build_config("synthetic", ["loss.path=fused"]).loss.path == "fused"
    # paper scale: the three bit masks (~0.9 GiB) fit the 6 GiB CUDA default in one chunk; 0.25 GiB does not
    paper = dict(num_images=64, per_image=784, n=50_176)
    assert chunk_images_for_budget("fused", memory_bytes=6 * 2**30, **paper) == 64
    assert chunk_images_for_budget("fused", memory_bytes=0.25 * 2**30, **paper) == 18


@needs_triton
def test_interpreter_chosen_after_triton_was_imported_is_one_line(interpret: None,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(fused, "_library_interpreted", lambda: False)
    inputs = clustered_problem(2, 3, 8, 8, 4)
    rest = [inputs[k] for k in ("z", "z_lhp", "feats", "code_ema", "pool_agnostic", "pool_specific")]
    with pytest.raises(HPSegError, match="set after triton had been imported.*before starting Python"):
        hidden_positive_loss(*rest, num_images=2, tau=0.7, lam=0.5, path="fused")


def test_training_with_the_fused_path_where_it_cannot_run_stops_before_anything_is_written(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from hpseg.pipeline import run_training

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    out = tmp_path / "runs" / "fused"
    cfg = build_config("synthetic", ["loss.path=fused", f"train.out_dir={out}", "train.device=cpu"])
    with pytest.raises(HPSegError, match="path='fused' is unavailable.*loss.path=dense"):
        run_training(cfg)
    assert not out.exists() and not (tmp_path / "runs").exists()
