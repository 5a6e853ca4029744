"""The README's own-images commands, typed as printed, on folders of 3 and 10 generated photos
(trained end to end, then typed again: nothing changes), planned for 30 and 60; and what a user
finds afterwards: the report's path, the held-out list, run folders taken by segment and export,
and one line — never torch's advice — for a file that is not a checkpoint."""

from __future__ import annotations

import hashlib
import os
import re
import shlex
import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from hpseg.cli import main

README = Path(__file__).resolve().parents[1] / "README.md"


def _readme_command(start: str) -> list[str]:
    """The first command of the README's "Your own images" section that starts with ``start``,
    as argv (without ``hpseg`` and the trailing comment)."""
    section = README.read_text(encoding="utf-8").split("## Your own images", 1)[1]
    for line in section.splitlines():
        if line.startswith(f"hpseg {start}"):
            return shlex.split(line.split("#", 1)[0])[1:]
    raise AssertionError(f"no `hpseg {start}` command in the README's own-images section")


TRAIN = _readme_command("train --preset folder data.root=photos/")
EVALUATE = _readme_command("evaluate runs/photos --baseline")


def _make_photos(folder: Path, n: int) -> Path:
    """``n`` small 'photos' of different sizes and formats: a textured half and a flat half."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(n)
    for i in range(n):
        h, w = int(rng.integers(40, 72)), int(rng.integers(40, 96))
        top = rng.integers(0, 256, (h // 2, w, 3), dtype=np.uint8)
        bottom = np.tile(rng.integers(0, 256, (1, 1, 3), dtype=np.uint8), (h - h // 2, w, 1))
        Image.fromarray(np.concatenate([top, bottom])).save(folder / f"IMG_{i:04d}.{'jpg' if i % 3 else 'png'}")
    return folder


def _state(run: Path) -> dict[str, str]:
    return {str(p.relative_to(run)): hashlib.sha256(p.read_bytes()).hexdigest() for p in run.rglob("*") if p.is_file()}


@pytest.fixture(scope="module", params=[3, 10])
def readme_run(request, tmp_path_factory) -> Iterator[tuple[Path, int, str]]:
    """``hpseg train`` as printed in the README, in a fresh folder holding ``photos/``."""
    n = request.param
    work = tmp_path_factory.mktemp(f"readme{n}")
    _make_photos(work / "photos", n)
    cwd = os.getcwd()
    os.chdir(work)
    try:
        import logging

        records: list[str] = []

        class _Keep(logging.Handler):
            def emit(self, record: logging.LogRecord) -> None:
                records.append(record.getMessage())

        handler = _Keep()
        logging.getLogger("hpseg").addHandler(handler)
        try:
            assert main(TRAIN) == 0
        finally:
            logging.getLogger("hpseg").removeHandler(handler)
        yield work, n, "\n".join(records)
    finally:
        os.chdir(cwd)


def test_the_readme_command_trains_any_folder_and_fits_the_batch(readme_run) -> None:
    work, n, log = readme_run
    run = work / "runs" / "photos"
    assert (run / "best.pt").is_file() and (run / "final.pt").is_file()
    held = (run / "held_out.txt").read_text().splitlines()
    held = [line for line in held if not line.startswith("#")]
    n_train = n - len(held)
    assert len(held) >= 1 and n_train >= 2 and all((work / "photos" / f).is_file() for f in held)
    fitted = [line for line in log.splitlines() if "schedule fitted" in line]
    assert len(fitted) == 1 and f"train.batch_size 32 → {n_train}" in fitted[0]  # said in the same line


def test_typing_the_train_command_again_changes_nothing(readme_run, capsys) -> None:
    work, _, _ = readme_run
    run = work / "runs" / "photos"
    before = _state(run)
    capsys.readouterr()
    assert main(TRAIN) == 0
    out = capsys.readouterr().out
    assert "already holds this finished run: nothing was changed" in out
    assert _state(run) == before and sorted(p.name for p in (work / "runs").iterdir()) == ["photos"]


def test_the_readme_evaluation_runs_on_the_held_out_images_and_says_where_the_report_is(readme_run, capsys) -> None:
    work, _, _ = readme_run
    run = work / "runs" / "photos"
    capsys.readouterr()
    assert main(EVALUATE) == 0
    out = capsys.readouterr().out
    assert "report: runs/photos/eval/report.html" in out.splitlines()
    assert (run / "eval" / "report.html").is_file()
    held = (run / "held_out.txt").read_text()
    assert (run / "eval" / "held_out.txt").read_text() == held  # the evaluation carries the list

    from hpseg.data.holdout import read_held_out
    from hpseg.results import Results

    listed = read_held_out(run / "eval")
    assert listed and Results.read(run / "eval" / "results.json").protocol.n_images == len(listed)


@pytest.mark.parametrize("readme_run", [3], indirect=True)  # once is enough
def test_segment_and_name_take_the_run_folder(readme_run, capsys) -> None:
    work, _, _ = readme_run
    assert main(["name", "runs/photos", "0=flat", "3=fine-texture"]) == 0
    capsys.readouterr()
    assert main(["segment", "runs/photos", "photos/IMG_0000.png", "--out", "seg/"]) == 0
    captured = capsys.readouterr()
    assert "segmented 1 image into seg" in captured.out and "1 images" not in captured.err + captured.out
    import json

    legend = json.loads((work / "seg" / "legend.json").read_text())
    assert "flat" in [row["name"] for row in legend["labels"]] and "ignore" not in legend
    assert main(["report", "runs/photos"]) == 0  # the run folder, like every other command
    assert "report written: runs/photos/eval/report.html" in capsys.readouterr().out


# -- 30 and 60 photos: the planning step of the same command --------------------------------


@pytest.mark.parametrize("n", [30, 60])
def test_the_readme_command_plans_30_and_60_photos(tmp_path, n) -> None:
    """What ``hpseg train`` decides before its first step, on the README's argv: the split, the
    batch and the schedule (training itself is the code path of the 3- and 10-photo runs)."""
    from hpseg.cli.commands import overrides
    from hpseg.cli.main import build_parser
    from hpseg.config import build_config
    from hpseg.pipeline import build_train_set, build_val_set
    from hpseg.schedule import fit_schedule, run_length

    _make_photos(tmp_path / "photos", n)
    args = build_parser().parse_args(TRAIN)
    cfg = build_config(args.preset, [o.replace("data.root=photos/", f"data.root={tmp_path / 'photos'}")
                                     for o in overrides(args)])
    train, val = build_train_set(cfg), build_val_set(cfg)
    assert len(train) + len(val) == n and 1 <= len(val) < n / 2
    fitted = fit_schedule(cfg, len(train), len(val)).config
    assert fitted.train.batch_size == min(32, len(train))
    per_epoch, total = run_length(fitted, len(train))
    assert per_epoch >= 1 and total >= 10 and fitted.loss.warmup < total / 4


# -- files that are not checkpoints ---------------------------------------------------------


@pytest.fixture(scope="module")
def not_checkpoints(readme_run) -> dict[str, Path]:
    """Random bytes, and hpseg's own exports under their default and under checkpoint-like names."""
    work, _, _ = readme_run
    run = work / "runs" / "photos"
    assert main(["export", "runs/photos", "--no-verify"]) == 0  # default name, next to best.pt
    assert main(["export", "runs/photos", "--format", "torchscript", "--no-verify"]) == 0
    assert main(["export", "runs/photos", "--out", "model.pt", "--format", "torchscript", "--no-verify"]) == 0
    (work / "random.pt").write_bytes(os.urandom(3000))
    (work / "onnx.pt").write_bytes((run / "model.onnx").read_bytes())
    return {"random": work / "random.pt", "onnx": run / "model.onnx", "torchscript": run / "model.ts",
            "torchscript named .pt": work / "model.pt", "onnx named .pt": work / "onnx.pt"}


@pytest.mark.parametrize("readme_run", [3], indirect=True)
def test_exports_have_names_no_command_takes_for_a_checkpoint(not_checkpoints) -> None:
    assert not_checkpoints["onnx"].name == "model.onnx" and not_checkpoints["torchscript"].name == "model.ts"
    assert not_checkpoints["torchscript named .pt"].is_file()  # an explicit name is still accepted


@pytest.mark.parametrize("kind, says", [("random", "not a PyTorch file"), ("onnx", "onnxruntime"),
                                        ("torchscript", "torch.jit.load"),
                                        ("torchscript named .pt", "torch.jit.load"),
                                        ("onnx named .pt", "onnxruntime")])
@pytest.mark.parametrize("command", ["evaluate", "segment", "export"])
@pytest.mark.parametrize("readme_run", [3], indirect=True)
def test_a_file_that_is_not_a_checkpoint_is_one_line_naming_it(not_checkpoints, capsys, kind, says, command) -> None:
    path = not_checkpoints[kind]
    argv = [command, str(path), *(["photos/", "--out", "seg-x/"] if command == "segment" else [])]
    capsys.readouterr()
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        assert main(argv) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if not re.match(r"\d\d:\d\d:\d\d INFO", line)]
    assert len(lines) == 1 and lines[0].startswith(f"error: cannot read {path}: ")
    assert says in lines[0] and "give a run folder or its best.pt" in lines[0]
    assert "weights_only=False" not in err and "likely succeed" not in err
    assert not [w for w in seen if issubclass(w.category, UserWarning)]  # no raw warning from torch
    from hpseg.errors import HPSegError

    with pytest.raises(HPSegError) as info:  # -v: the traceback is hpseg's only
        main(["-v", *argv])
    assert info.value.__cause__ is None and info.value.__context__ is None
    assert "weights_only=False" not in str(info.value)
