"""Dense CRF post-processing (docs/method.md §8), as in the authors' evaluation.

The optional dependency ``pydensecrf2`` (extra ``crf``, imported as ``pydensecrf``) is loaded
lazily, only when a CRF is run. Steps per image: de-normalise the ImageNet-normalised image to
8-bit colour (``x * 255`` truncated, as ``to_pil_image`` does), upsample the logits bilinearly
to the image size, softmax, unary = ``-log(clip(p, 1e-5))``, Gaussian pairwise term
(``sxy=1, compat=3``), bilateral term (``sxy=67, srgb=3, compat=4``), 10 mean-field iterations.

The authors hand the bilateral term the image with its channels reversed (BGR). The
permutohedral lattice behind pydensecrf is not invariant to the order of the features, so the
order changes results noticeably; we pass BGR as well to reproduce theirs.
"""

from __future__ import annotations

import logging
from concurrent.futures import ProcessPoolExecutor
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from hpseg.errors import HPSegError
from hpseg.imaging import IMAGENET_MEAN, IMAGENET_STD

log = logging.getLogger(__name__)


#: dense_crf's keyword defaults (the authors' settings)
CRF_DEFAULTS: dict[str, float] = {
    "max_iter": 10,
    "pos_xy_std": 1.0,
    "pos_w": 3.0,
    "bi_xy_std": 67.0,
    "bi_rgb_std": 3.0,
    "bi_w": 4.0,
}

MISSING_MESSAGE = (
    "dense CRF needs pydensecrf2: pip install 'hpseg[crf]' (or run without CRF: eval.crf=false, no --crf)"
)


def _import_densecrf() -> tuple[Any, Any]:
    """Return the ``pydensecrf.densecrf`` and ``pydensecrf.utils`` modules or raise HPSegError."""
    try:
        import pydensecrf.densecrf as dcrf
        import pydensecrf.utils as dcrf_utils
    except ImportError as exc:  # absent, or a compiled extension that fails to load
        raise HPSegError(MISSING_MESSAGE) from exc
    return dcrf, dcrf_utils


def require_crf() -> None:
    """Raise :class:`HPSegError` (with the install command) unless the dense CRF can run."""
    _import_densecrf()


def crf_available() -> bool:
    """Whether ``pydensecrf2`` can be imported (the ``crf`` extra is installed)."""
    try:
        _import_densecrf()
    except HPSegError:
        return False
    return True


def _check_inputs(images: torch.Tensor, logits: torch.Tensor, batched: bool) -> None:
    nd = 4 if batched else 3
    img_shape = "(B, 3, H, W)" if batched else "(3, H, W)"
    log_shape = "(B, C, h, w)" if batched else "(C, h, w)"
    if not isinstance(images, torch.Tensor) or not isinstance(logits, torch.Tensor):
        raise HPSegError("dense CRF inputs must be torch tensors")
    if images.dim() != nd or images.shape[-3] != 3:
        raise HPSegError(f"CRF image must be {img_shape} ImageNet-normalised, got {tuple(images.shape)}")
    if logits.dim() != nd or logits.shape[-3] < 1:
        raise HPSegError(f"CRF logits must be {log_shape}, got {tuple(logits.shape)}")
    if batched and images.shape[0] != logits.shape[0]:
        raise HPSegError(
            f"CRF batch sizes differ: {images.shape[0]} images, {logits.shape[0]} logits; pass one per image"
        )
    if not images.is_floating_point() or not logits.is_floating_point():
        raise HPSegError("CRF image and logits must be floating point tensors")


def _image_to_bgr_uint8(images: torch.Tensor) -> np.ndarray:
    """``(..., 3, H, W)`` normalised → ``(..., H, W, 3)`` uint8, channels reversed (BGR)."""
    x = images.detach().to("cpu", torch.float32)
    mean = torch.tensor(IMAGENET_MEAN, dtype=torch.float32).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD, dtype=torch.float32).view(3, 1, 1)
    x = (x * std + mean) * 255.0
    # truncation like to_pil_image's ``mul(255).byte()``; clamping first keeps the rare
    # out-of-range values defined (the authors' cast wraps them around)
    rgb = x.clamp_(0.0, 255.0).to(torch.uint8).movedim(-3, -1).numpy()
    return np.ascontiguousarray(rgb[..., ::-1])


def _upsampled_probs(logits: torch.Tensor, size: tuple[int, int]) -> np.ndarray:
    """``(B, C, h, w)`` logits → ``(B, C, H, W)`` float32 softmax after bilinear upsampling."""
    x = logits.detach().to("cpu", torch.float32)
    x = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
    return np.ascontiguousarray(F.softmax(x, dim=1).numpy())


def _crf_numpy(
    bgr: np.ndarray,
    probs: np.ndarray,
    max_iter: int,
    pos_xy_std: float,
    pos_w: float,
    bi_xy_std: float,
    bi_rgb_std: float,
    bi_w: float,
) -> np.ndarray:
    """Mean-field inference on one image: ``bgr`` (H, W, 3) uint8, ``probs`` (C, H, W) → (C, H, W)."""
    dcrf, dcrf_utils = _import_densecrf()
    c, h, w = probs.shape
    crf = dcrf.DenseCRF2D(w, h, c)
    crf.setUnaryEnergy(np.ascontiguousarray(dcrf_utils.unary_from_softmax(probs)))
    crf.addPairwiseGaussian(sxy=pos_xy_std, compat=pos_w)
    crf.addPairwiseBilateral(sxy=bi_xy_std, srgb=bi_rgb_std, rgbim=bgr, compat=bi_w)
    q = crf.inference(max_iter)
    return np.asarray(q, dtype=np.float32).reshape(c, h, w)


def _crf_job(args: tuple[Any, ...]) -> np.ndarray:
    return _crf_numpy(*args)


def dense_crf(
    image: torch.Tensor,
    logits: torch.Tensor,
    *,
    max_iter: int = 10,
    pos_xy_std: float = 1.0,
    pos_w: float = 3.0,
    bi_xy_std: float = 67.0,
    bi_rgb_std: float = 3.0,
    bi_w: float = 4.0,
) -> torch.Tensor:
    """Refine one image's class scores with a dense CRF.

    Args:
        image: ``(3, H, W)`` ImageNet-normalised image.
        logits: ``(C, h, w)`` class logits (or log-probabilities) at any resolution.
        max_iter: mean-field iterations.
        pos_xy_std, pos_w: Gaussian (smoothness) kernel width and weight.
        bi_xy_std, bi_rgb_std, bi_w: bilateral (appearance) kernel widths and weight.

    Returns:
        ``(C, H, W)`` float32 probabilities (each pixel sums to 1) on ``logits``' device.

    Raises:
        HPSegError: pydensecrf2 is not installed, or the shapes are wrong.
    """
    _check_inputs(image, logits, batched=False)
    _import_densecrf()
    height, width = int(image.shape[-2]), int(image.shape[-1])
    bgr = _image_to_bgr_uint8(image)
    probs = _upsampled_probs(logits.unsqueeze(0), (height, width))[0]
    q = _crf_numpy(bgr, probs, max_iter, pos_xy_std, pos_w, bi_xy_std, bi_rgb_std, bi_w)
    return torch.from_numpy(q).to(logits.device)


def batched_crf(
    images: torch.Tensor,
    logits: torch.Tensor,
    *,
    workers: int = 0,
    **params: Any,
) -> torch.Tensor:
    """:func:`dense_crf` over a batch.

    Args:
        images: ``(B, 3, H, W)`` ImageNet-normalised images.
        logits: ``(B, C, h, w)`` class logits.
        workers: ``0`` or ``1`` runs serially; ``n > 1`` spreads the images over ``n``
            processes (worth it only with several cores and large images).
        **params: CRF parameters of :func:`dense_crf` (``max_iter``, ``bi_w``, ...).

    Returns:
        ``(B, C, H, W)`` float32 probabilities on ``logits``' device.
    """
    _check_inputs(images, logits, batched=True)
    _import_densecrf()
    defaults = CRF_DEFAULTS
    unknown = sorted(set(params) - set(defaults))
    if unknown:
        raise HPSegError(f"unknown CRF parameter(s) {', '.join(unknown)}: use {', '.join(defaults)}")
    if workers < 0:
        raise HPSegError(f"workers must be >= 0, got {workers}")
    cfg = {**defaults, **params}
    cfg["max_iter"] = int(cfg["max_iter"])
    settings = tuple(cfg[k] for k in defaults)
    height, width = int(images.shape[-2]), int(images.shape[-1])
    bgr = _image_to_bgr_uint8(images)
    probs = _upsampled_probs(logits, (height, width))
    jobs = [(bgr[i], probs[i], *settings) for i in range(images.shape[0])]
    if workers > 1 and len(jobs) > 1:
        with ProcessPoolExecutor(max_workers=min(workers, len(jobs))) as pool:
            outs = list(pool.map(_crf_job, jobs))
    else:
        outs = [_crf_job(job) for job in jobs]
    if not outs:
        return torch.zeros(0, logits.shape[1], height, width, device=logits.device)
    return torch.from_numpy(np.stack(outs)).to(logits.device)
