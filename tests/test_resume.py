"""Resuming is exact: a run killed (or pre-empted) and started again ends with the weights of a
run never interrupted — every random stream (data order, augmentation, dropout, negative
sampling, pool sampling) is saved in ``last.pt`` and restored."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest
import torch

import hpseg.train as train_module
from hpseg.config import build_config
from hpseg.pipeline import train_one

SETTINGS = [
    "data.synthetic_train_images=12",
    "data.synthetic_val_images=4",
    "data.resolution=32",
    "data.eval_resolution=32",
    "data.synthetic_classes=3",
    "model.dim=8",
    "train.batch_size=4",
    "train.epochs=3",  # 3 iterations per epoch, 9 in all
    "train.valid_freq=2",
    "train.log_freq=1",
    "train.progress=false",
    "loss.pool_size=8",
    "loss.warmup=1",
    "loss.renew_interval=2",
    "loss.rho=0.25",  # negatives are sampled: that random stream must be restored too
    "eval.batch_size=4",
]


class _Crash(Exception):
    """Stands for SIGKILL: the process dies between two steps without saving anything."""


def _config(tmp_path: Path, weights: Path, name: str):
    return build_config("synthetic", [*SETTINGS, "model.backbone=dino_vits8", f"model.weights={weights}",
                                      f"train.out_dir={tmp_path / name}"])


def _interrupt_after(monkeypatch, steps: int, action) -> None:
    """Make ``train_step`` call ``action()`` after its ``steps``-th call."""
    real = train_module.train_step
    calls = {"n": 0}

    def step(*args, **kwargs):
        out = real(*args, **kwargs)
        calls["n"] += 1
        if calls["n"] == steps:
            action()
        return out

    monkeypatch.setattr(train_module, "train_step", step)


def _weights(run: Path) -> dict[str, torch.Tensor]:
    return torch.load(run / "final.pt", weights_only=True)["state_dict"]


def _train_rows(run: Path) -> list[dict]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k != "seconds"} for r in rows if "val" not in r]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, tiny_backbone_file) -> Path:
    tmp = tmp_path_factory.mktemp("straight")
    train_one(_config(tmp, tiny_backbone_file, "run"), tmp / "run")
    return tmp / "run"


def _assert_same_run(run: Path, reference: Path) -> None:
    a, b = _weights(run), _weights(reference)
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key  # exactly, on CPU
    assert _train_rows(run) == _train_rows(reference)  # same losses at every step, no step twice


def test_killed_and_resumed_equals_uninterrupted(tmp_path, tiny_backbone_file, monkeypatch, uninterrupted):
    cfg = _config(tmp_path, tiny_backbone_file, "run")

    def crash() -> None:
        raise _Crash

    _interrupt_after(monkeypatch, 5, crash)  # dies in iteration 5; the last save was at the end of epoch 1
    with pytest.raises(_Crash):
        train_one(cfg, tmp_path / "run")
    assert torch.load(tmp_path / "run" / "last.pt", weights_only=True)["state"]["iteration"] == 3
    monkeypatch.undo()
    torch.manual_seed(1234)  # whatever the new process's random state: last.pt decides
    train_one(cfg, tmp_path / "run")
    _assert_same_run(tmp_path / "run", uninterrupted)


def test_preempted_by_sigterm_saves_and_resumes_exactly(tmp_path, tiny_backbone_file, monkeypatch, uninterrupted):
    cfg = _config(tmp_path, tiny_backbone_file, "run")
    _interrupt_after(monkeypatch, 4, lambda: os.kill(os.getpid(), signal.SIGTERM))
    with pytest.raises(KeyboardInterrupt, match="resume"):
        train_one(cfg, tmp_path / "run")
    assert torch.load(tmp_path / "run" / "last.pt", weights_only=True)["state"]["iteration"] == 4  # mid-epoch
    monkeypatch.undo()
    train_one(cfg, tmp_path / "run")
    _assert_same_run(tmp_path / "run", uninterrupted)
