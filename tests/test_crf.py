"""Tests for hpseg.crf: golden parity, output distribution, batching, missing dependency."""

from __future__ import annotations

import sys

import pytest
import torch
import torch.nn.functional as F

from hpseg import crf as crf_module
from hpseg.crf import MISSING_MESSAGE, batched_crf, crf_available, dense_crf
from hpseg.errors import HPSegError

needs_crf = pytest.mark.skipif(
    not crf_available(), reason="pydensecrf2 not importable: pip install 'hpseg[crf]' to run CRF tests"
)


def _inputs(b: int, c: int = 3, size: tuple[int, int] = (16, 20), seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(b, 3, *size, generator=g).clamp(-2.0, 2.0)
    logits = 3 * torch.randn(b, c, size[0] // 4, size[1] // 4, generator=g)
    return images, logits


@needs_crf
def test_golden_parity(load_golden):
    g = load_golden("crf.pt")
    out = dense_crf(g["image_normalized"], g["logits"])
    assert out.shape == g["crf_probs"].shape and out.dtype == torch.float32
    assert torch.allclose(out, g["crf_probs"], atol=1e-4, rtol=0)


@needs_crf
def test_output_is_a_distribution_per_pixel():
    images, logits = _inputs(1, c=4)
    out = dense_crf(images[0], logits[0])
    assert out.shape == (4, 16, 20)
    assert bool((out >= 0).all())
    assert torch.allclose(out.sum(0), torch.ones(16, 20), atol=1e-5)


@needs_crf
def test_zero_iterations_return_the_upsampled_softmax():
    # with no mean-field step the output is the unary's distribution: softmax of the
    # bilinearly upsampled logits (probabilities clipped at 1e-5 by the unary)
    images, logits = _inputs(1)
    out = dense_crf(images[0], logits[0], max_iter=0)
    ref = F.softmax(F.interpolate(logits, size=(16, 20), mode="bilinear", align_corners=False)[0], 0)
    assert torch.allclose(out, ref, atol=1e-4)


@needs_crf
def test_log_probabilities_give_the_same_result_as_logits():
    images, logits = _inputs(1)
    a = dense_crf(images[0], logits[0])
    b = dense_crf(images[0], torch.log_softmax(logits[0], 0))
    assert torch.allclose(a, b, atol=1e-5)


@needs_crf
@pytest.mark.parametrize("workers", [0, 2])
def test_batched_equals_per_image(workers):
    images, logits = _inputs(2, seed=1)
    out = batched_crf(images, logits, workers=workers)
    assert out.shape == (2, 3, 16, 20)
    for i in range(2):
        assert torch.allclose(out[i], dense_crf(images[i], logits[i]), atol=1e-6)


@needs_crf
def test_batched_passes_parameters():
    images, logits = _inputs(1, seed=2)
    out = batched_crf(images, logits, max_iter=3, bi_w=1.0)
    assert torch.allclose(out[0], dense_crf(images[0], logits[0], max_iter=3, bi_w=1.0), atol=1e-6)
    with pytest.raises(HPSegError):
        batched_crf(images, logits, iterations=3)


def test_missing_package_raises_with_install_hint(monkeypatch):
    # None in sys.modules makes ``import pydensecrf...`` raise ImportError
    for name in ("pydensecrf", "pydensecrf.densecrf", "pydensecrf.utils"):
        monkeypatch.setitem(sys.modules, name, None)
    images, logits = _inputs(1)
    assert crf_module.crf_available() is False
    with pytest.raises(HPSegError) as err:
        dense_crf(images[0], logits[0])
    assert str(err.value) == MISSING_MESSAGE
    assert "pip install 'hpseg[crf]'" in str(err.value) and "eval.crf=false" in str(err.value)
    with pytest.raises(HPSegError):
        batched_crf(images, logits)


@pytest.mark.parametrize(
    "image, logits",
    [
        (torch.zeros(1, 3, 8, 8), torch.zeros(2, 4, 4)),  # batched image for dense_crf
        (torch.zeros(4, 8, 8), torch.zeros(2, 4, 4)),  # 4 channels
        (torch.zeros(3, 8, 8), torch.zeros(4, 4)),  # logits without class dim
    ],
)
def test_bad_shapes_raise(image, logits):
    with pytest.raises(HPSegError) as err:
        dense_crf(image, logits)
    assert "\n" not in str(err.value)


def test_batched_size_mismatch_raises():
    with pytest.raises(HPSegError):
        batched_crf(torch.zeros(2, 3, 8, 8), torch.zeros(3, 2, 4, 4))
