"""Every default of the authors, per paper preset, against what hpseg actually builds.

The expected values are literals copied from the authors' code (hynnsk/HP, commit 8913644,
``json/server/<dataset>.json`` — the three files share one line layout — and ``run.py``,
``build.py``, ``loss.py``, ``model/dino/DinoFeaturizer.py``, ``utils/seg_utils.py``), each with
its file and line. hpseg's values are read from the objects the pipeline builds where there is
one: :func:`hpseg.pipeline.train_one` runs up to the first training step (on synthetic images
at the preset's resolution, with a random backbone of the preset's architecture) and the step's
arguments — the objective, the optimisers, the scaler, the EMA momentum, the pools — and the
data plan are inspected (no batch is loaded); the λ schedule is read from the call ``fit`` makes; the rest from the configuration.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

import hpseg.data.transforms as transforms_module
import hpseg.train as train_module
from hpseg import pipeline
from hpseg.config import build_config
from hpseg.crf import CRF_DEFAULTS
from hpseg.hidden_positives import lambda_schedule
from hpseg.hidden_positives.loss import BASE_TEMPERATURE
from hpseg.runtime import Runtime

# json/server/<file>: line → value (cocostuff.json, cityscapes.json, potsdam.json share the layout)
AUTHORS_JSON: dict[str, dict[str, Any]] = {
    "cocostuff27": {
        "file": "cocostuff.json",
        "crop_type": "five",       # :15
        "crop_ratio": 0.5,         # :16
        "res": 224,                # :17
        "batch_size": 64,          # :21
        "tau": 0.8,                # :25
        "alpha": 0.05,             # :26
        "rho": 0.02,               # :27
        "loss_version": 1,         # :28
        "reweighting": 1,          # :29
        "renew_interval": 100,     # :31
        "pool_size": 2048,         # :34
        "ema_m": 0.99,             # :35
        "warmup": 1000,            # :36
        "dim": 512,                # :41
        "extra_clusters": 0,       # :42
        "model_type": "vit_small",  # :47
        "patch": 8,                # :48
        "dropout": True,           # :52
        "lr_net": 5e-4,            # :76
        "weight_decay_net": 0.1,   # :77
        "lr_linear": 1e-3,         # :81
        "lr_cluster": 5e-3,        # :85
        "print_freq": 25,          # :91
        "valid_freq": 100,         # :92
        "epochs": 3,               # :93
        "grad_norm": 10.0,         # :97
        "is_crf": True,            # :103
    },
}
AUTHORS_JSON["cityscapes27"] = {**AUTHORS_JSON["cocostuff27"], "file": "cityscapes.json", "tau": 0.6,  # :25
                                "renew_interval": 20, "ema_m": 0.999, "warmup": 50,  # :31 :35 :36
                                "epochs": 30}  # :93
AUTHORS_JSON["potsdam3"] = {**AUTHORS_JSON["cocostuff27"], "file": "potsdam.json", "tau": 0.4, "alpha": 0.0,
                            "rho": 1.0,  # :25 :26 :27
                            "renew_interval": 20, "pool_size": 1024, "ema_m": 0.999, "warmup": 100,  # :31-36
                            "dim": 256, "model_type": "vit_base",  # :41 :47
                            "valid_freq": 50, "epochs": 10}  # :92 :93

# literals in the authors' code
DROPOUT_P = 0.1            # model/dino/DinoFeaturizer.py:24  torch.nn.Dropout2d(p=.1)
SIGMA = 28.0               # model/dino/DinoFeaturizer.py:19  self.sigma = 28
BASE_TEMP = 0.07           # loss.py:165                      SupConLoss(base_temperature=0.07)
SCALER_INIT, SCALER_GROWTH_INTERVAL = 2048.0, 1000  # run.py:30  GradScaler(init_scale=2048, growth_interval=1000)
SCALER_GROWTH, SCALER_BACKOFF = 2.0, 0.5            # run.py:30  (GradScaler's defaults, not overridden)
ADAM_BETAS, ADAM_EPS = (0.9, 0.999), 1e-8           # build.py:106/112/118, run.py:71 (torch defaults)
EVAL_BATCH = 16            # run.py:54                       build_dataloader(val_dataset, ..., batch_size=16)
EVAL_RES = 320             # build.py:201                    get_transform(320, False, "center")
CRF = {"max_iter": 10, "pos_w": 3.0, "pos_xy_std": 1.0,         # utils/seg_utils.py:13-15
       "bi_w": 4.0, "bi_xy_std": 67.0, "bi_rgb_std": 3.0}        # utils/seg_utils.py:16-18
BACKBONES = {("vit_small", 8): "dino_vits8", ("vit_base", 8): "dino_vitb8"}  # DinoFeaturizer.py:29-35 (urls)
PRESETS = tuple(AUTHORS_JSON)


def authors_lambda(trainingiter: int, warmup: int, maxiter: int) -> float:
    """run.py:138-141, verbatim in meaning."""
    return 0.0 if trainingiter <= warmup else (trainingiter - warmup) / (maxiter - warmup)


class _FirstStep(Exception):
    pass


def _built(preset: str, out_dir: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """What ``train_one`` builds for ``preset`` (64 synthetic images, random backbone, CPU), up
    to the first training step."""
    overrides = ["data.dataset=synthetic", "data.synthetic_train_images=64", "data.synthetic_val_images=2",
                 "model.pretrained=false", "train.device=cpu", "data.num_workers=0", "train.progress=false"]
    cfg = build_config(preset, overrides)
    seen: dict[str, Any] = {"cfg": cfg, "lambda_calls": []}

    def first_step(step_module, model, batch, pools, lam, optimizers, scaler, runtime, *, ema_m, **kw):
        seen.update(objective=step_module, model=model, batch=batch, pools=pools, optimizers=optimizers,
                    scaler=scaler, runtime=runtime, ema_m=ema_m)
        raise _FirstStep

    def schedule(it: int, warmup: int, max_iters: int) -> float:
        seen["lambda_calls"].append((it, warmup, max_iters))
        return lambda_schedule(it, warmup, max_iters)

    monkeypatch.setattr(train_module, "train_step", first_step)
    monkeypatch.setattr(train_module, "lambda_schedule", schedule)
    monkeypatch.setattr(train_module.ReferencePools, "build", lambda self, *a, **k: None)  # 2048 entries: skipped
    # the photometric view is slow on a busy CPU (its settings: test_photometric_augmentation_is_the_authors)
    monkeypatch.setattr(transforms_module, "photometric_augmentation", lambda: (lambda x: x))
    real_create = train_module.DataPlan.create.__func__  # type: ignore[attr-defined]

    def create(cls: type, train_set: Any, train: Any, runtime: Any, num_workers: int) -> Any:
        plan = real_create(cls, train_set, train, runtime, num_workers)
        seen.update(plan=plan, train_set=train_set)
        plan.epoch = lambda iteration: (0, iter([{}]))  # the step is never run: no batch is loaded
        return plan

    monkeypatch.setattr(train_module.DataPlan, "create", classmethod(create))
    # fp16 as on CUDA (build_runtime falls back to fp32 on a CPU), so that fit builds an active scaler
    runtime = Runtime(torch.device("cpu"), "fp16", cfg.train.precision, 0, 1, 0, False)
    with pytest.raises(_FirstStep):
        pipeline.train_one(cfg, out_dir, runtime)
    return seen


@pytest.fixture(scope="module", params=PRESETS)
def built(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[str, dict[str, Any]]:
    with pytest.MonkeyPatch.context() as mp:
        return request.param, _built(request.param, tmp_path_factory.mktemp(request.param), mp)


def test_optimisers_as_the_authors(built: tuple[str, dict[str, Any]]) -> None:
    preset, seen = built
    a, opts, model = AUTHORS_JSON[preset], seen["optimizers"].all, seen["model"]
    expected = {  # name: (type, lr, weight decay, parameters)
        "head": (torch.optim.AdamW, a["lr_net"], a["weight_decay_net"], model.head),  # build.py:106
        "projection": (torch.optim.Adam, a["lr_net"], 0.0, model.projection),  # run.py:71: optimizer.net.lr
        "linear": (torch.optim.Adam, a["lr_linear"], 0.0, model.linear_probe),  # build.py:112
        "cluster": (torch.optim.Adam, a["lr_cluster"], 0.0, model.cluster_probe),  # build.py:118
    }
    assert set(opts) == set(expected)
    for name, (kind, lr, wd, module) in expected.items():
        opt = opts[name]
        assert type(opt) is kind, name
        (group,) = opt.param_groups
        assert group["lr"] == pytest.approx(lr, rel=1e-12), name
        assert group["weight_decay"] == pytest.approx(wd, abs=1e-15), name
        assert tuple(group["betas"]) == ADAM_BETAS and group["eps"] == ADAM_EPS, name
        assert not group["amsgrad"] and not group.get("maximize", False), name
        assert {id(p) for p in group["params"]} == {id(p) for p in module.parameters()}, name


def test_clipping_norm_and_module(built: tuple[str, dict[str, Any]], monkeypatch: pytest.MonkeyPatch) -> None:
    """run.py:225 clips ``net_model.parameters()`` — the segmentation head's trainable tensors
    (the backbone and the EMA copy have no gradients) — at ``train.grad_norm``."""
    preset, seen = built
    optimizers, model = seen["optimizers"], seen["model"]
    calls: list[tuple[set[int], float]] = []
    real = torch.nn.utils.clip_grad_norm_

    def spy(params: Any, max_norm: float, *args: Any, **kwargs: Any) -> torch.Tensor:
        params = list(params)
        calls.append(({id(p) for p in params}, float(max_norm)))
        return real(params, max_norm, *args, **kwargs)

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", spy)
    trainable = [p for p in model.parameters() if p.requires_grad]
    saved = [p.detach().clone() for p in trainable]
    for p in trainable:
        p.grad = torch.ones_like(p)
    optimizers.step(torch.amp.GradScaler("cpu", enabled=False))  # unscaled gradients: only the clipping matters
    with torch.no_grad():
        for p, s in zip(trainable, saved):
            p.copy_(s)
    assert calls == [({id(p) for p in model.head.parameters()}, AUTHORS_JSON[preset]["grad_norm"])]


def test_objective_and_step_settings(built: tuple[str, dict[str, Any]]) -> None:
    preset, seen = built
    a, objective = AUTHORS_JSON[preset], seen["objective"]
    assert objective.hp_loss.tau == a["tau"] and objective.hp_loss.rho == a["rho"]
    assert objective.hp_loss.reweight is (a["reweighting"] == 1) and a["loss_version"] == 1
    assert BASE_TEMPERATURE == BASE_TEMP
    assert objective.alpha == a["alpha"] and objective.sigma == SIGMA
    assert seen["ema_m"] == a["ema_m"]
    assert a["dropout"] and objective.dropout == DROPOUT_P
    assert seen["model"].spec.dropout == DROPOUT_P and seen["pools"].dropout == DROPOUT_P


def test_model_data_and_schedule(built: tuple[str, dict[str, Any]]) -> None:
    preset, seen = built
    a, cfg, model, plan = AUTHORS_JSON[preset], seen["cfg"], seen["model"], seen["plan"]
    assert cfg.model.backbone == BACKBONES[(a["model_type"], a["patch"])]
    assert model.backbone.patch_size == a["patch"]
    assert model.spec.dim == a["dim"] and model.projection.linear.out_features == a["dim"]
    assert a["extra_clusters"] == 0 and model.cluster_probe.n_clusters == model.n_classes
    assert plan.per_rank == plan.loader.batch_size == a["batch_size"] and plan.loader.drop_last  # build.py:223
    assert tuple(seen["train_set"][0]["img"].shape[-2:]) == (a["res"], a["res"]) == (cfg.data.resolution,) * 2
    assert cfg.data.crop_ratio == a["crop_ratio"] and a["crop_type"] == "five"
    assert cfg.data.five_crop is (preset != "potsdam3")  # the authors' Potsdam reader takes whole tiles
    assert cfg.train.epochs == a["epochs"] and cfg.train.valid_freq == a["valid_freq"]
    assert cfg.train.log_freq == a["print_freq"]
    assert cfg.loss.pool_size == a["pool_size"] and cfg.loss.renew_interval == a["renew_interval"]
    per_epoch = 64 // a["batch_size"]  # the 64 synthetic images
    assert seen["lambda_calls"] == [(0, a["warmup"], per_epoch * a["epochs"])]


def test_scaler_and_precision(built: tuple[str, dict[str, Any]]) -> None:
    preset, seen = built
    cfg = seen["cfg"]
    assert cfg.train.precision == "fp16"  # run.py:30 autocast + GradScaler(enabled=True)
    scaler = seen["scaler"]  # the one fit built and hands to the step
    assert isinstance(scaler, torch.amp.GradScaler) and scaler.is_enabled() and scaler.get_scale() == SCALER_INIT
    assert scaler.get_growth_interval() == SCALER_GROWTH_INTERVAL
    assert scaler.get_growth_factor() == SCALER_GROWTH and scaler.get_backoff_factor() == SCALER_BACKOFF


def test_evaluation_settings(built: tuple[str, dict[str, Any]]) -> None:
    preset, seen = built
    cfg, a = seen["cfg"], AUTHORS_JSON[preset]
    assert cfg.data.eval_resolution == EVAL_RES and cfg.eval.batch_size == EVAL_BATCH
    val_set = pipeline.build_val_set(cfg)
    assert tuple(val_set[0]["img"].shape[-2:]) == (EVAL_RES, EVAL_RES)
    assert pipeline.eval_loader(val_set, cfg).batch_size == EVAL_BATCH
    assert cfg.eval.crf is a["is_crf"] and CRF_DEFAULTS == CRF


@pytest.mark.parametrize("warmup", [0, 3, 50, 100, 1000])
def test_lambda_schedule_is_the_authors(warmup: int) -> None:
    maxiter = 2 * warmup + 7
    for it in range(maxiter + 1):
        assert lambda_schedule(it, warmup, maxiter) == authors_lambda(it, warmup, maxiter), (it, warmup)


def test_photometric_augmentation_is_the_authors() -> None:
    """build.py:166-168: ColorJitter(.3, .3, .3, .1), RandomGrayscale(.2), RandomApply([GaussianBlur((5, 5))])
    (RandomApply's p 0.5 and GaussianBlur's sigma (0.1, 2.0) are torchvision's defaults)."""
    jitter, gray, blur = transforms_module.photometric_augmentation().transforms
    assert (jitter.brightness, jitter.contrast, jitter.saturation) == ((0.7, 1.3),) * 3 and jitter.hue == (-0.1, 0.1)
    assert gray.p == 0.2
    assert blur.p == 0.5 and len(blur.transforms) == 1
    assert tuple(blur.transforms[0].kernel_size) == (5, 5) and tuple(blur.transforms[0].sigma) == (0.1, 2.0)
