"""Where dropout applies in a training step and in the pools: a spy on every ``dropout2d`` call,
checked against the list in docs/method.md §2 ("Where dropout applies").

The spy records, for each call, the tensor it was given (recognised by value among the step's
tensors: the backbone features, the augmented view's features, the EMA head's code, the
propagated code), the module that called it, the rate and the training flag, and returns its
input unchanged so that every later tensor stays recognisable.
"""

from __future__ import annotations

import sys
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F

import hpseg
from hpseg.backbones import build_backbone
from hpseg.config import LossConfig, TrainConfig
from hpseg.hidden_positives import HiddenPositiveLoss, local_propagation
from hpseg.model import HPModel
from hpseg.runtime import Runtime
from hpseg.train import HPObjective, Optimizers, ReferencePools, train_step

P = 0.1

# docs/method.md §2, "Where dropout applies": (caller, tensor) → calls per training step
STEP_DROPOUTS = {
    ("SegmentationHead", "feats"): 2,  # online head: the input of each branch
    ("EMAHead", "feats"): 2,  # EMA head: the input of each branch
    ("HPObjective", "code_ema"): 1,  # EMA head's output (s, the task-specific side)
    ("HPObjective", "feats"): 1,  # the task-agnostic side f
    ("HPObjective", "code_lhp"): 1,  # the propagated code (z_lhp)
    ("SegmentationHead", "feats_aug"): 2,  # augmented view: the input of each branch
}
# per batch of a pool pass
POOL_DROPOUTS = {
    "agnostic": {("ReferencePools", "feats"): 1},
    "specific": {("EMAHead", "feats"): 2, ("ReferencePools", "code_ema"): 1},
}


HPSEG_DIR = str(Path(hpseg.__file__).resolve().parent)


def _caller() -> str:
    """The class of the first hpseg frame up the stack (skipping torch's Dropout2d.forward and
    hpseg's ``share_dropout2d``, which passes the call on)."""
    frame = sys._getframe(2)
    while frame is not None:
        in_hpseg = str(Path(frame.f_code.co_filename).resolve()).startswith(HPSEG_DIR)
        if in_hpseg and frame.f_code.co_name != "share_dropout2d":
            owner = frame.f_locals.get("self")
            return type(owner).__name__ if owner is not None else frame.f_code.co_name
        frame = frame.f_back  # type: ignore[assignment]
    return "?"


class DropoutSpy:
    def __init__(self) -> None:
        self.calls: list[tuple[str, torch.Tensor, float, bool]] = []

    def __call__(self, x: torch.Tensor, p: float = 0.5, training: bool = True, inplace: bool = False) -> torch.Tensor:
        self.calls.append((_caller(), x.detach().clone(), float(p), bool(training)))
        return x

    def named(self, known: dict[str, torch.Tensor]) -> Counter[tuple[str, str]]:
        """``(caller, name of the tensor)`` per active call (a rate > 0 in training)."""
        out: Counter[tuple[str, str]] = Counter()
        for caller, x, p, training in self.calls:
            if p == 0 or not training:
                continue
            names = [n for n, t in known.items() if t.shape == x.shape and torch.allclose(t, x, atol=1e-6)]
            assert len(names) == 1, f"{caller} dropped out an unrecognised tensor {tuple(x.shape)}: {names}"
            out[(caller, names[0])] += 1
        return out


@pytest.fixture(scope="module")
def setup(load_golden) -> dict[str, Any]:
    g = load_golden("train_loop.pt")
    s = g["settings"]
    backbone = build_backbone("dino_custom", state_dict=g["initial"]["backbone"], num_heads=s["num_heads"])
    torch.manual_seed(0)
    model = HPModel.create(backbone, dim=s["dim"], n_classes=s["n_classes"], dropout=P)
    with torch.no_grad():  # an EMA head apart from the online one, so that their codes differ
        for p in model.ema_head.parameters():
            p.add_(0.1 * torch.randn_like(p))
    batch = {"img": g["data"]["img"][:4].float(), "img_aug": g["data"]["img_aug"][:4].float(),
             "label": g["data"]["label"][:4].long()}
    return {"model": model, "batch": batch, "pools": g["pools_initial"]}


def _known(model: HPModel, batch: dict[str, torch.Tensor], sigma: float) -> dict[str, torch.Tensor]:
    """The step's tensors without dropout (eval mode)."""
    model.eval()
    with torch.no_grad():
        out = model.backbone(batch["img"])
        feats_aug = model.backbone.features(batch["img_aug"])
        return {"feats": out.feats, "feats_aug": feats_aug, "code_ema": model.ema_head(out.feats),
                "code_lhp": local_propagation(out.attn_logits, model.head(out.feats), sigma=sigma),
                "code": model.head(out.feats)}


def test_dropout_in_a_training_step(setup: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    model, batch = setup["model"], setup["batch"]
    loss_cfg = LossConfig(rho=1.0, alpha=0.1)
    known = _known(model, batch, loss_cfg.sigma)  # before the step moves the heads
    objective = HPObjective(model, HiddenPositiveLoss(loss_cfg.tau, 1.0), alpha=loss_cfg.alpha, sigma=loss_cfg.sigma)
    pools = ReferencePools(4, P, torch.Generator().manual_seed(0))
    pools.agnostic, pools.specific = setup["pools"]["agnostic"], setup["pools"]["specific"]
    runtime = Runtime.create("cpu", "fp32")
    spy = DropoutSpy()
    monkeypatch.setattr(F, "dropout2d", spy)
    model.train()
    train_step(objective, model, batch, pools, 0.5, Optimizers(model, TrainConfig()), runtime.grad_scaler(), runtime,
               ema_m=0.99)
    assert spy.calls and all(p == P and training for _, _, p, training in spy.calls)
    assert spy.named(known) == Counter(STEP_DROPOUTS)  # the code given to the probes is never dropped


def test_no_augmented_view_without_consistency(setup: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    model, batch = setup["model"], setup["batch"]
    known = _known(model, batch, 28.0)
    objective = HPObjective(model, HiddenPositiveLoss(0.8, 1.0), alpha=0.0, sigma=28.0)
    spy = DropoutSpy()
    monkeypatch.setattr(F, "dropout2d", spy)
    model.train()
    with torch.no_grad():
        out = model.backbone(batch["img"])
        objective(out.feats, out.attn_logits, out.feats, batch["label"], setup["pools"]["agnostic"],
                  setup["pools"]["specific"], 0.5)
    expected = {k: v for k, v in STEP_DROPOUTS.items() if k[1] != "feats_aug"}
    assert spy.named(known) == Counter(expected)


@pytest.mark.parametrize("which", ["agnostic", "specific"])
def test_dropout_in_the_pools(setup: dict[str, Any], monkeypatch: pytest.MonkeyPatch, which: str) -> None:
    model, batch = setup["model"], setup["batch"]
    known = _known(model, batch, 28.0)
    spy = DropoutSpy()
    monkeypatch.setattr(F, "dropout2d", spy)
    pools = ReferencePools(4, P, torch.Generator().manual_seed(0))
    pools.collect(model, [batch], Runtime.create("cpu", "fp32"), which)
    assert all(p == P and training for _, _, p, training in spy.calls)
    assert spy.named(known) == Counter(POOL_DROPOUTS[which])


def test_no_dropout_at_inference(setup: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    model, batch = setup["model"], setup["batch"]
    spy = DropoutSpy()
    monkeypatch.setattr(F, "dropout2d", spy)
    model.eval()
    with torch.no_grad():
        model.scores(batch["img"])
    assert not [c for c in spy.calls if c[2] > 0 and c[3]]
