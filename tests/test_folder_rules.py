"""The rules of the folder path at their boundaries: which images are held out, how many
unreadable files are tolerated, how the batch and schedule are fitted, the smallest folder, and
when a re-typed command is the same run."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from hpseg.checkpointing import REQUESTED_FILE, check_run_folder
from hpseg.config import build_config
from hpseg.data.folder import FolderDataset
from hpseg.data.holdout import MIN_FOLDER_IMAGES, holdout_indices, name_position, read_held_out
from hpseg.errors import HPSegError
from hpseg.schedule import fit_schedule, fitted_batch_size, run_length

NAMES = [f"IMG_{i:04d}" for i in range(200)]


# -- held-out images ------------------------------------------------------------------------


@pytest.mark.parametrize("n, held", [(0, 0), (1, 0), (2, 0), (3, 1)])
def test_the_smallest_folders_hold_out_one_image_from_three_up(n, held) -> None:
    train, out = holdout_indices(NAMES[:n], 0.2)
    assert len(out) == held and sorted(train + out) == list(range(n))


def test_at_least_one_is_held_out_and_two_are_trained_on() -> None:
    for n in range(MIN_FOLDER_IMAGES, 40):
        for start in range(0, 120, 7):  # many different folders of n names
            train, held = holdout_indices(NAMES[start:start + n], 0.2)
            assert len(held) >= 1 and len(train) >= 2 and not set(train) & set(held)
    # every name below the fraction held out but two: the names with the largest positions train
    low = [n for n in NAMES if name_position(n) < 0.2][:5]
    train, held = holdout_indices(low, 0.2)
    assert len(held) == 3 and {low[i] for i in train} == set(sorted(low, key=name_position)[-2:])


def test_an_image_is_held_out_by_its_own_name() -> None:
    _, held = holdout_indices(NAMES, 0.2)
    assert {NAMES[i] for i in held} == {n for n in NAMES if name_position(n) < 0.2}
    assert 0.1 < len(held) / len(NAMES) < 0.3  # about the fraction
    assert holdout_indices(list(reversed(NAMES)), 0.2)[1] == sorted(len(NAMES) - 1 - i for i in held)  # order-free


@pytest.mark.parametrize("start", [3, 10, 30])
def test_adding_photos_never_moves_a_held_out_photo_into_training(start) -> None:
    """Grow a folder one photo at a time from ``start`` to 60: what was held out stays held out,
    and a photo trained on stays trained on, once a name falls below the fraction."""
    rng = np.random.default_rng(start)
    names = list(rng.permutation(NAMES)[:60])
    before_held: set[str] = set()
    for n in range(start, 61):
        folder = sorted(names[:n])  # the dataset sorts by path: new photos land anywhere
        train, held = holdout_indices(folder, 0.2)
        now_held = {folder[i] for i in held}
        if before_held and all(name_position(f) < 0.2 for f in before_held):  # not the one-photo fallback
            assert before_held <= now_held, n
        before_held = now_held


def test_no_holdout_trains_on_everything() -> None:
    assert holdout_indices(NAMES[:10], 0.0) == (list(range(10)), [])


# -- unreadable files -----------------------------------------------------------------------


def _folder_with_bad(root: Path, good: int, bad: int) -> Path:
    root.mkdir()
    for i in range(good):
        Image.new("RGB", (8, 8), (i % 256, 0, 0)).save(root / f"g{i:03d}.png")
    for i in range(bad):
        (root / f"b{i:03d}.jpg").write_text("not an image")
    return root


@pytest.mark.parametrize("good, bad, fraction, ok", [
    (9, 1, 0.1, True), (8, 2, 0.1, False),  # 10 % of 10 tolerated, 20 % not
    (71, 29, 0.29, True), (70, 30, 0.29, False),  # 0.29 · 100 = 28.999… in floating point: 29 of 100 is 29 %
    (0, 3, 1.0, False),  # nothing readable: refused whatever the fraction
])
def test_unreadable_files_are_tolerated_up_to_the_fraction_exactly(tmp_path, good, bad, fraction, ok) -> None:
    root = _folder_with_bad(tmp_path / "photos", good, bad)
    if ok:
        ds = FolderDataset(root, n_classes=2, max_skipped_fraction=fraction)
        assert len(ds) == good and len(ds.skipped) == bad
    else:
        with pytest.raises(HPSegError, match=rf"{bad} of {good + bad} images .* cannot be read"):
            FolderDataset(root, n_classes=2, max_skipped_fraction=fraction)


# -- batch and schedule ---------------------------------------------------------------------


def _readme(*extra: str):
    """The README's own-images command, as a configuration."""
    return build_config("folder", ["data.root=photos/", "data.n_classes=6", "backbone=hpseg_demo_vit",
                                   "model.dim=64", "data.resolution=96", "data.eval_resolution=160", *extra])


@pytest.mark.parametrize("n_train, batch", [(1, 32), (2, 2), (3, 3), (8, 8), (24, 24), (31, 31), (32, 32),
                                            (33, 32), (48, 32), (3200, 32)])
def test_the_batch_is_fitted_to_the_training_images(n_train, batch, caplog) -> None:
    with caplog.at_level(logging.INFO, logger="hpseg.schedule"):
        fitted = fit_schedule(_readme(), n_train=n_train, n_val=2)
    assert fitted.config.train.batch_size == batch
    if 2 <= n_train:
        assert run_length(fitted.config, n_train)[1] >= 10  # ten epochs of at least one iteration
    line = [r.getMessage() for r in caplog.records if "schedule fitted" in r.getMessage()]
    said = bool(line) and f"train.batch_size 32 → {batch}" in line[0]
    assert said == (batch != 32)  # said in the one log line of the fitted schedule


def test_the_batch_fits_every_process_of_a_distributed_run() -> None:
    assert fitted_batch_size(32, 9, world_size=2) == 8 and fitted_batch_size(32, 3, world_size=2) == 32
    assert fitted_batch_size(32, 4, world_size=2) == 4


def test_the_batch_is_kept_when_asked_and_for_the_paper_presets() -> None:
    assert fit_schedule(_readme("train.auto_schedule=false"), n_train=8, n_val=2).config.train.batch_size == 32
    coco = build_config("cocostuff27", ["data.root=/data"])
    assert fit_schedule(coco, n_train=8, n_val=2).config.train.batch_size == coco.train.batch_size


@pytest.mark.parametrize("n_photos, n_train", [(3, 2), (10, 8), (30, 24), (60, 48)])
def test_the_readme_command_plans_a_run_for_any_folder_size(n_photos, n_train) -> None:
    """The planning step of the README's command for a folder of ``n_photos``: λ switches on,
    the pool is renewed, validation runs a few times, every training image is used."""
    from hpseg.hidden_positives import lambda_schedule

    fitted = fit_schedule(_readme(), n_train=n_train, n_val=n_photos - n_train).config
    per_epoch, total = run_length(fitted, n_train)
    assert per_epoch >= 1 and total == per_epoch * 10
    assert fitted.train.batch_size == min(32, n_train)
    assert sum(lambda_schedule(i, fitted.loss.warmup, total) > 0 for i in range(total)) > total / 2
    assert 2 <= total // fitted.train.valid_freq <= 4 and total // fitted.loss.renew_interval >= 2


# -- the smallest folder, refused at start ----------------------------------------------------


def _photos(root: Path, n: int) -> Path:
    root.mkdir(parents=True)
    rng = np.random.default_rng(n)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (24, 32, 3), dtype=np.uint8)).save(root / f"im{i:02d}.jpg")
    return root


@pytest.mark.parametrize("n_good, n_bad", [(2, 0), (1, 0), (2, 1)])
def test_a_folder_below_the_minimum_is_refused_before_anything_is_written(tmp_path, capsys, n_good, n_bad) -> None:
    from hpseg.cli import main

    photos = _photos(tmp_path / "photos", n_good)
    for i in range(n_bad):
        (photos / f"bad{i}.jpg").write_text("no image")
    cwd = os.getcwd()
    try:
        os.chdir(tmp_path)
        code = main(["train", "--preset", "folder", "data.root=photos/", "data.n_classes=6", "backbone=hpseg_demo_vit",
                     "model.dim=64", "data.resolution=96", "data.eval_resolution=160",
                     "data.max_skipped_fraction=0.5"])
    finally:
        os.chdir(cwd)
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert code == 2 and len(lines) == 1 and "Traceback" not in err
    assert f"photos/ has {n_good} readable image(s)" in lines[0] and "fewer than the 3 a run needs" in lines[0]
    assert ("cannot be read" in lines[0]) == bool(n_bad) and "add images" in lines[0]
    assert not (tmp_path / "runs").exists()  # nothing written


def test_the_baseline_refuses_a_folder_below_the_minimum_in_the_same_words(tmp_path, capsys) -> None:
    from hpseg.cli import main

    photos = _photos(tmp_path / "photos", 2)
    assert main(["baseline", "--preset", "folder", f"data.root={photos}", "data.n_classes=6",
                 "backbone=hpseg_demo_vit", "data.resolution=96", "data.eval_resolution=160"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: ") and "has 2 readable image(s), fewer than the 3" in err[-1]


# -- the same command typed again -----------------------------------------------------------


def _finished_run(folder: Path, requested, n_train: int) -> None:
    """A finished run folder as training leaves it: fitted config.yaml, requested.yaml."""
    folder.mkdir(parents=True)
    (folder / "config.yaml").write_text(fit_schedule(requested, n_train, 2).config.to_yaml())
    (folder / REQUESTED_FILE).write_text(yaml.safe_dump(requested.to_dict()))
    (folder / "final.pt").write_bytes(b"x")
    (folder / "train_summary.json").write_text(json.dumps({"iterations": 10}))


def test_a_retyped_command_is_the_same_finished_run(tmp_path) -> None:
    run = tmp_path / "run"
    _finished_run(run, _readme(), n_train=8)
    again = _readme()
    fitted = fit_schedule(again, 8, 2).config.to_dict()
    assert check_run_folder(run, fitted, requested=again.to_dict())["already_finished"]
    # photos added since: hpseg fits other values, the command is the same: still the same run
    more = fit_schedule(again, 16, 4).config.to_dict()
    assert check_run_folder(run, more, requested=again.to_dict())["already_finished"]
    # a setting typed differently is another run, named by what was typed, not by fitted values
    other = _readme("model.dim=32")
    with pytest.raises(HPSegError, match=r"\(model.dim 64 → 32\)") as info:
        check_run_folder(run, fit_schedule(other, 8, 2).config.to_dict(), requested=other.to_dict())
    assert "loss.warmup" not in str(info.value) and "batch_size" not in str(info.value)


def test_a_run_of_the_batch_workaround_is_the_same_as_the_readme_command(tmp_path) -> None:
    """A run trained with ``train.batch_size=8`` (the old workaround) on 8 training images
    computes what the README's command computes now: the same run."""
    run = tmp_path / "run"
    _finished_run(run, _readme("train.batch_size=8"), n_train=8)
    again = _readme()
    assert check_run_folder(run, fit_schedule(again, 8, 2).config.to_dict(),
                            requested=again.to_dict())["already_finished"]


def test_the_held_out_list_is_read_back(tmp_path) -> None:
    assert read_held_out(tmp_path) is None
    (tmp_path / "held_out.txt").write_text("# 2 image(s) held out\na.jpg\nsub/b.png\n")
    assert read_held_out(tmp_path) == ["a.jpg", "sub/b.png"]
