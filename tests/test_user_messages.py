"""What a user is told: which checkpoint a path names, settings typed as options, the patch size,
unreadable files — each one line naming the problem and the fix."""

from __future__ import annotations

from pathlib import Path

import pytest

from hpseg.checkpoint import resolve_checkpoint
from hpseg.cli import main
from hpseg.config import build_config
from hpseg.errors import HPSegError, UnreadableFileError


def _best(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "best.pt").write_bytes(b"x")
    return folder / "best.pt"


def test_a_run_folder_names_its_best_checkpoint(tmp_path) -> None:
    best = _best(tmp_path / "photos")
    assert resolve_checkpoint(tmp_path / "photos") == best
    assert resolve_checkpoint(best) == best
    (tmp_path / "export.onnx").write_bytes(b"x")
    assert resolve_checkpoint(tmp_path / "export.onnx") == tmp_path / "export.onnx"  # files are read as given


@pytest.mark.parametrize("subs, says", [
    (["k-10", "k-4", "k-6"], r"one run per K \(hpseg sweep-k\) \(k-4, k-6, k-10\): give one of them, e.g. \S*k-4"),
    (["seed-1", "seed-0"], r"one run per seed \(seed-0, seed-1\): give one of them, e.g. \S*seed-0"),
])
def test_a_folder_of_runs_says_which_to_give(tmp_path, subs, says) -> None:
    for sub in subs:
        _best(tmp_path / "runs" / sub)
    with pytest.raises(HPSegError, match=says):
        resolve_checkpoint(tmp_path / "runs")


def test_an_unfinished_or_empty_folder_says_so(tmp_path) -> None:
    (tmp_path / "run").mkdir()
    with pytest.raises(HPSegError, match="holds no best.pt: give a run folder that finished training"):
        resolve_checkpoint(tmp_path / "run")
    (tmp_path / "run" / "last.pt").write_bytes(b"x")
    with pytest.raises(HPSegError, match="unfinished run .* finish it"):
        resolve_checkpoint(tmp_path / "run")
    with pytest.raises(HPSegError, match="does not exist: give a run folder"):
        resolve_checkpoint(tmp_path / "nothing")


@pytest.mark.parametrize("command", ["segment", "export", "evaluate", "name"])
def test_every_model_command_says_what_a_folder_of_k_runs_holds(tmp_path, capsys, command) -> None:
    for k in (4, 6):
        _best(tmp_path / "runs" / f"k-{k}")
    from PIL import Image

    Image.new("RGB", (8, 8)).save(tmp_path / "photo.png")
    extra = {"segment": [str(tmp_path / "photo.png"), "--out", str(tmp_path / "seg")],
             "name": ["0=sky"]}.get(command, [])
    assert main([command, str(tmp_path / "runs"), *extra]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: ") and "one run per K" in err[-1] and "k-4" in err[-1]


@pytest.mark.parametrize("typed, hint", [
    (["--epochs", "5"], "train.epochs=5"), (["--epochs=3"], "train.epochs=3"),
    (["--batch-size", "8"], "train.batch_size=8"), (["--resolution", "96"], "data.resolution=96"),
])
def test_a_setting_typed_as_an_option_gets_its_key_value_form(capsys, typed, hint) -> None:
    with pytest.raises(SystemExit) as info:
        main(["train", "--preset", "folder", "data.root=photos/", *typed])
    err = capsys.readouterr().err
    assert info.value.code == 2 and f"settings are key=value: {hint}" in err


def test_an_option_that_is_no_setting_gets_no_hint(capsys) -> None:
    with pytest.raises(SystemExit):
        main(["train", "--preset", "folder", "--frobnicate"])
    assert "settings are key=value" not in capsys.readouterr().err


@pytest.mark.parametrize("backbone, patch", [("vit_small_patch14_dinov2", 14), ("dino_vits8", 8)])
def test_a_resolution_off_the_patch_grid_names_data_resolution(tmp_path, backbone, patch) -> None:
    from hpseg.config import check_resolutions
    from hpseg.pipeline import build_model

    cfg = build_config("folder", ["data.root=photos/", "data.n_classes=3", f"backbone={backbone}",
                                  "model.pretrained=false", "data.resolution=100", "data.eval_resolution=160"])
    fit = max(patch, round(100 / patch) * patch)
    with pytest.raises(HPSegError, match=rf"data.resolution=100 is not a multiple of the patch size {patch} .*"
                                         rf"set data.resolution={fit}"):
        if patch == 14:
            check_resolutions(cfg, patch, backbone)
        else:
            build_model(cfg, 3, ["a", "b", "c"])
    cfg.data.resolution = 98
    if patch == 14:
        with pytest.raises(HPSegError, match=r"data.eval_resolution=160 .* set data.eval_resolution=154"):
            check_resolutions(cfg, patch, backbone)


def test_an_unreadable_image_is_to_be_replaced_or_deleted_not_removed_from_a_list(tmp_path) -> None:
    damaged = str(UnreadableFileError.for_file(tmp_path / "a.jpg", "OSError: truncated"))
    assert "image list" not in damaged and damaged.endswith("replace it with a readable copy, or delete it")
    missing = str(UnreadableFileError.for_file(tmp_path / "b.jpg", "file not found"))
    assert "image list" not in missing and missing.endswith("restore it or check the path")
