"""Bitwise repeatability on CUDA (run by ``benchmarks/gpu_check.sh``; skipped without a GPU).

Two evaluations of the loss's forward + backward on the same inputs give the same bits, on the
dense path and on the fused one (when this build has it: it raises ``HPSegError`` otherwise and
the test is skipped with that message), and two training runs with the same settings end with
identical weights and identical logged losses. On CPU the same property is tested by
``tests/test_train.py`` (deterministic training) and ``tests/test_resume.py``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from hpseg.config import build_config
from hpseg.errors import HPSegError
from hpseg.hidden_positives import hidden_positive_loss
from hpseg.pipeline import train_one

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: bitwise repeats on a GPU")


def _inputs(b: int, s: int, d: int, f: int, p: int, device: torch.device) -> dict[str, torch.Tensor]:
    """Clustered unit rows ``z, z_lhp (N, D)``, ``feats (N, F)``, ``code_ema (N, D)``, pools ``(P, ·)``."""
    gen = torch.Generator(device=device).manual_seed(0)
    n = b * s * s

    def unit(*shape: int) -> torch.Tensor:
        return F.normalize(torch.randn(*shape, generator=gen, device=device), dim=-1)

    label = torch.randint(8, (n,), generator=gen, device=device)
    feats = F.normalize(unit(8, f)[label] + 0.7 * unit(n, f), dim=1)
    code = F.normalize(unit(8, d)[label] + 0.7 * unit(n, d), dim=1)
    return {"z": F.normalize(code + 0.5 * unit(n, d), dim=1), "z_lhp": F.normalize(code + 0.5 * unit(n, d), dim=1),
            "feats": feats, "code_ema": code, "pool_agnostic": unit(p, f), "pool_specific": unit(p, d)}


def _loss_and_grads(x: dict[str, torch.Tensor], path: str) -> tuple[torch.Tensor, ...]:
    z, z_lhp = x["z"].clone().requires_grad_(True), x["z_lhp"].clone().requires_grad_(True)
    loss = hidden_positive_loss(z, z_lhp, x["feats"], x["code_ema"], x["pool_agnostic"], x["pool_specific"],
                                num_images=8, tau=0.8, lam=0.5, rho=0.02, path=path, chunk_images=3, seed=5, step=7)
    loss.backward()
    assert z.grad is not None and z_lhp.grad is not None
    return loss.detach(), z.grad, z_lhp.grad


@pytest.mark.parametrize("path", ["dense", "fused"])
def test_loss_forward_backward_is_bitwise_repeatable_on_cuda(path: str) -> None:
    """N = 8·14² at the paper's widths (D 512, F 384, P 2048), fp16 products (the CUDA default),
    chunks of 3 images (the last one shorter): twice the same bits."""
    x = _inputs(8, 14, 512, 384, 2048, torch.device("cuda"))
    try:
        first = _loss_and_grads(x, path)
    except HPSegError as exc:
        pytest.skip(f"path={path} is not available here: {exc}")
    second = _loss_and_grads(x, path)
    assert bool(torch.isfinite(first[0])) and float(first[1].abs().sum()) > 0
    for name, a, b in zip(("loss", "grad z", "grad z_lhp"), first, second):
        assert torch.equal(a, b), f"{path}: {name} differs between two identical evaluations"


def _run(tmp_path: Path, weights: Path, name: str, path: str) -> tuple[dict[str, torch.Tensor], list[Any]]:
    cfg = build_config("synthetic", [
        "data.synthetic_train_images=16", "data.synthetic_val_images=4", "data.resolution=32",
        "data.eval_resolution=32", "data.synthetic_classes=3", "model.dim=8", "train.batch_size=4",
        "train.epochs=2", "train.valid_freq=100", "train.log_freq=1", "train.progress=false", "train.device=cuda",
        "train.precision=fp16", "loss.pool_size=8", "loss.warmup=2", "loss.renew_interval=3", "loss.rho=0.25",
        f"loss.path={path}", "eval.batch_size=4", "model.backbone=dino_vits8", f"model.weights={weights}",
        f"train.out_dir={tmp_path / name}",
    ])
    train_one(cfg, tmp_path / name)
    state = torch.load(tmp_path / name / "final.pt", weights_only=True)["state_dict"]
    rows = [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
    return state, [{k: v for k, v in r.items() if k != "seconds"} for r in rows if "val" not in r]


@pytest.mark.parametrize("path", ["auto", "fused"])
def test_two_training_runs_are_bitwise_identical_on_cuda(tmp_path: Path, tiny_backbone_file: Path, path: str) -> None:
    """Eight fp16 iterations (the warm-up ends, the task-specific pool is renewed mid-run, ρ < 1):
    two runs with one seed end with the same bits and log the same losses."""
    try:
        a, rows_a = _run(tmp_path, tiny_backbone_file, "a", path)
    except HPSegError as exc:
        pytest.skip(f"loss.path={path} is not available here: {exc}")
    b, rows_b = _run(tmp_path, tiny_backbone_file, "b", path)
    assert len(rows_a) == 8 and rows_a == rows_b
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
