"""The schedule fitted to a folder: warm-up, renewal, validation cadence and subset."""

from __future__ import annotations

import logging

import pytest

from hpseg.config import build_config
from hpseg.hidden_positives import lambda_schedule
from hpseg.schedule import VALID_IMAGES, VALIDATIONS, fit_schedule, run_length


def _folder(*overrides: str):
    return build_config("folder", ["data.root=photos", "data.n_classes=6", *overrides])


def test_small_folder_gets_a_schedule_where_lambda_ramps(caplog) -> None:
    cfg = _folder()  # batch 32, 10 epochs, warm-up 50, renewal 20, validation every 50
    with caplog.at_level(logging.INFO, logger="hpseg.schedule"):
        fitted = fit_schedule(cfg, n_train=36, n_val=9)
    per_epoch, total = run_length(cfg, 36)
    assert (per_epoch, total) == (1, 10)
    f = fitted.config
    assert f.train.counting == "global"
    lam = [lambda_schedule(it, f.loss.warmup, total) for it in range(total)]
    assert sum(v > 0 for v in lam) > total / 2  # λ > 0 for most of the run
    assert 2 <= total // f.train.valid_freq <= VALIDATIONS
    assert total // f.loss.renew_interval >= 2  # the task-specific pool is renewed during the run
    assert set(fitted.changes) >= {"loss.warmup", "loss.renew_interval", "train.valid_freq", "train.counting",
                                   "train.log_freq"}
    assert total // f.train.log_freq >= 10  # a training curve with points
    assert cfg.loss.warmup == 50 and cfg.train.counting == "epoch"  # the input is left alone
    logged = [r.getMessage() for r in caplog.records if "schedule fitted" in r.getMessage()]
    assert len(logged) == 1 and "loss.warmup 50 → 2" in logged[0]


def test_validation_subset_is_bounded_for_large_held_out_sets() -> None:
    fitted = fit_schedule(_folder(), n_train=3200, n_val=800)
    assert fitted.config.train.valid_images == VALID_IMAGES
    assert fit_schedule(_folder("train.valid_images=40"), n_train=3200, n_val=800).config.train.valid_images == 40


def test_a_schedule_that_fits_is_kept() -> None:
    cfg = _folder()
    fitted = fit_schedule(cfg, n_train=3200, n_val=10)  # 100 iterations per epoch, 1000 in all
    assert fitted.changes == {}
    assert fitted.config.to_dict() == cfg.to_dict()


@pytest.mark.parametrize("preset", ["cocostuff27", "cityscapes27", "potsdam3"])
def test_paper_presets_are_untouched(preset) -> None:
    cfg = build_config(preset, ["data.root=/data"])
    assert fit_schedule(cfg, n_train=40, n_val=10).config.to_dict() == cfg.to_dict()


def test_opting_out_keeps_the_preset_and_warns_when_lambda_cannot_ramp(caplog) -> None:
    cfg = _folder("train.auto_schedule=false")
    with caplog.at_level(logging.WARNING, logger="hpseg.schedule"):
        fitted = fit_schedule(cfg, n_train=36, n_val=9)
    assert fitted.changes == {} and fitted.config.loss.warmup == 50
    assert any("λ stays 0" in r.getMessage() for r in caplog.records)
