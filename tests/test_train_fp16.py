"""The fp16 path of a training step: the gradient scaler's order of operations, the skipped
step on overflow, and the scaler's state and the random streams across a resume.

Authors' order (run.py:217-235): ``scaler.scale(loss).backward()``, ``scaler.unscale_(net_optimizer)``,
``clip_grad_norm_(net_model.parameters(), grad_norm)``, ``scaler.step`` of each optimiser,
``scaler.update()``. The EMA update happens inside the forward, before any of it.
On the CPU a real ``GradScaler("cpu")`` stands for the CUDA one (same arithmetic); the CUDA
random stream is checked on a GPU only.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from hpseg.backbones import build_backbone
from hpseg.checkpointing import Checkpointer, TrainState
from hpseg.config import TrainConfig
from hpseg.hidden_positives import HiddenPositiveLoss
from hpseg.model import HPModel
from hpseg.runtime import Runtime
from hpseg.train import HPObjective, Optimizers, ReferencePools, train_step


def _fp16_runtime(device: str = "cpu") -> Runtime:
    """fp16 as on CUDA (Runtime.create falls back to fp32 off CUDA)."""
    return Runtime(torch.device(device), "fp16", "fp16", 0, 1, 0, False)


@pytest.fixture(scope="module")
def golden(load_golden) -> dict[str, Any]:
    return load_golden("train_loop.pt")


def _model(golden: dict[str, Any]) -> HPModel:
    s = golden["settings"]
    backbone = build_backbone("dino_custom", state_dict=golden["initial"]["backbone"], num_heads=s["num_heads"])
    torch.manual_seed(0)
    return HPModel.create(backbone, dim=s["dim"], n_classes=s["n_classes"], dropout=0.0)


def _batch(golden: dict[str, Any]) -> dict[str, torch.Tensor]:
    d = golden["data"]
    return {"img": d["img"][:4].float(), "img_aug": d["img_aug"][:4].float(), "label": d["label"][:4].long()}


class ScalerStandIn:
    """Records what the step asks of a gradient scaler; scales by 1."""

    def __init__(self, events: list[str], names: dict[int, str]) -> None:
        self.events, self.names = events, names

    def scale(self, loss: torch.Tensor) -> torch.Tensor:
        self.events.append("scale")
        return loss

    def unscale_(self, opt: torch.optim.Optimizer) -> None:
        self.events.append(f"unscale:{self.names[id(opt)]}")

    def step(self, opt: torch.optim.Optimizer) -> None:
        self.events.append(f"step:{self.names[id(opt)]}")
        opt.step()

    def update(self) -> None:
        self.events.append("update")


def test_step_order_unscale_clip_step(golden: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    model = _model(golden)
    optimizers = Optimizers(model, TrainConfig())
    events: list[str] = []
    scaler = ScalerStandIn(events, {id(o): n for n, o in optimizers.all.items()})
    real_clip = torch.nn.utils.clip_grad_norm_
    real_ema, real_zero = model.ema_head.ema_update, optimizers.zero_grad

    def clip(params: Any, max_norm: float, *a: Any, **k: Any) -> torch.Tensor:
        params = list(params)
        assert all(p.grad is not None for p in params), "clipping before backward"
        events.append("clip:head" if {id(p) for p in params} == {id(p) for p in model.head.parameters()} else "clip:?")
        return real_clip(params, max_norm, *a, **k)

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", clip)
    monkeypatch.setattr(model.ema_head, "ema_update", lambda *a, **k: (events.append("ema"), real_ema(*a, **k)))
    monkeypatch.setattr(optimizers, "zero_grad", lambda: (events.append("zero_grad"), real_zero()))
    objective = HPObjective(model, HiddenPositiveLoss(0.8, 1.0), alpha=0.05, sigma=28.0)
    pools = ReferencePools(4, 0.0, torch.Generator())
    pools.agnostic, pools.specific = golden["pools_initial"]["agnostic"], golden["pools_initial"]["specific"]
    model.train()
    train_step(objective, model, _batch(golden), pools, 0.5, optimizers, scaler, _fp16_runtime(),  # type: ignore[arg-type]
               ema_m=0.99)
    assert events[:5] == ["ema", "zero_grad", "scale", "unscale:head", "clip:head"]
    assert sorted(events[5:9]) == ["step:cluster", "step:head", "step:linear", "step:projection"]
    assert events[9:] == ["update"]


def _scaled_grads(model: HPModel, scaler: torch.amp.GradScaler) -> None:
    loss = sum((p.float() ** 2).sum() for p in model.parameters() if p.requires_grad)
    scaler.scale(loss).backward()  # type: ignore[union-attr]


@pytest.mark.parametrize("overflow", [False, True])
def test_an_overflowing_head_step_is_skipped(golden: dict[str, Any], overflow: bool) -> None:
    model = _model(golden)
    optimizers = Optimizers(model, TrainConfig())
    scaler = _fp16_runtime().grad_scaler()
    assert scaler.is_enabled() and scaler.get_scale() == 2048.0
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    optimizers.zero_grad()
    _scaled_grads(model, scaler)
    if overflow:
        next(model.head.parameters()).grad.view(-1)[0] = float("inf")  # type: ignore[union-attr]
    optimizers.step(scaler)
    moved = {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
    head = {f"head.{k}" for k, _ in model.head.named_parameters()}
    probes = {k for k in before if k.startswith(("projection.", "linear_probe.", "cluster_probe."))}
    assert probes <= moved  # the other optimisers step either way (four optimisers, as the authors)
    assert head.isdisjoint(moved) if overflow else head <= moved
    assert scaler.get_scale() == (1024.0 if overflow else 2048.0)  # backoff 0.5; growth only after 1000 steps


def _checkpoint_round_trip(tmp_path: Path, golden: dict[str, Any], runtime: Runtime) -> tuple[Any, ...]:
    model = _model(golden).to(runtime.device)
    optimizers = Optimizers(model, TrainConfig())
    scaler = runtime.grad_scaler()
    optimizers.zero_grad()
    _scaled_grads(model, scaler)
    next(model.head.parameters()).grad.view(-1)[0] = float("inf")  # type: ignore[union-attr]
    optimizers.step(scaler)  # scale 2048 → 1024
    for _ in range(3):  # three good steps: growth tracker 3
        optimizers.zero_grad()
        _scaled_grads(model, scaler)
        optimizers.step(scaler)
    pools = ReferencePools(4, 0.0, torch.Generator().manual_seed(3))
    pools.agnostic, pools.specific = golden["pools_initial"]["agnostic"], golden["pools_initial"]["specific"]
    ckpt = Checkpointer(tmp_path, runtime, {})
    ckpt.save_last(model, optimizers, scaler, pools, TrainState(iteration=4))
    return model, optimizers, scaler, pools, ckpt


def test_scaler_state_survives_a_resume(tmp_path: Path, golden: dict[str, Any]) -> None:
    runtime = _fp16_runtime()
    _, _, scaler, _, ckpt = _checkpoint_round_trip(tmp_path, golden, runtime)
    saved = scaler.state_dict()
    assert saved["scale"] == 1024.0 and saved["_growth_tracker"] == 3
    model = _model(golden)
    fresh = runtime.grad_scaler()
    state = TrainState()
    assert ckpt.resume(model, Optimizers(model, TrainConfig()), fresh, ReferencePools(4, 0.0, torch.Generator()), state)
    assert fresh.state_dict() == saved and fresh.get_scale() == 1024.0 and state.iteration == 4


def test_cpu_random_stream_survives_a_resume(tmp_path: Path, golden: dict[str, Any]) -> None:
    runtime = _fp16_runtime()
    torch.manual_seed(11)
    model, optimizers, scaler, pools, ckpt = _checkpoint_round_trip(tmp_path, golden, runtime)
    expected = torch.rand(5)  # what the run draws next
    torch.rand(100)  # a crash later, elsewhere
    assert ckpt.resume(model, optimizers, scaler, pools, TrainState())
    torch.testing.assert_close(torch.rand(5), expected, rtol=0, atol=0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA random stream: needs a CUDA device")
def test_cuda_random_stream_survives_a_resume(tmp_path: Path, golden: dict[str, Any]) -> None:
    runtime = _fp16_runtime("cuda")
    torch.cuda.manual_seed(5)
    model, optimizers, scaler, pools, ckpt = _checkpoint_round_trip(tmp_path, golden, runtime)
    assert scaler.get_scale() == 1024.0
    expected = torch.rand(5, device="cuda")  # dropout masks, negative draws: the CUDA stream
    torch.rand(1000, device="cuda")
    fresh_scaler = runtime.grad_scaler()
    assert ckpt.resume(model, optimizers, fresh_scaler, pools, TrainState())
    torch.testing.assert_close(torch.rand(5, device="cuda"), expected, rtol=0, atol=0)
    assert fresh_scaler.get_scale() == 1024.0

