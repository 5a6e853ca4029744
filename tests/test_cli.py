"""CLI: commands run end to end on fixture data; user errors are one line, no traceback."""

from __future__ import annotations

import json

import pytest
import yaml

from fixtures_layouts import make_cocostuff_tree, make_folder_tree
from hpseg.cli import main


def _err(capsys) -> str:
    """The error lines of stderr (INFO logs go there too)."""
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return "\n".join(line for line in err.splitlines() if not line[:2].isdigit())


def test_config_prints_resolved_yaml(capsys):
    assert main(["config", "--preset", "cocostuff27", "data.root=/data", "train.batch_size=8"]) == 0
    cfg = yaml.safe_load(capsys.readouterr().out)
    assert cfg["train"]["batch_size"] == 8 and cfg["loss"]["tau"] == 0.8


@pytest.mark.parametrize("preset", ["cocostuff27", "cityscapes27", "potsdam3"])
def test_config_of_a_paper_preset_needs_no_data_root(preset, capsys):
    assert main(["config", "--preset", preset]) == 0
    cfg = yaml.safe_load(capsys.readouterr().out)
    assert cfg["train"]["precision"] == "fp16" and cfg["data"]["root"] is None
    if preset == "cityscapes27":
        assert cfg["data"]["five_crop"] is True


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["train", "--preset", "cocostuff27", "train.batchsize=2", "data.root=/x"], "did you mean train.batch_size"),
        (["train", "--preset", "nope"], "unknown preset 'nope'"),
        (["train", "--preset", "cocostuff27"], "data.root is not set"),
        (["train", "--preset", "cocostuff27", "data.root=/does/not/exist"], "/does/not/exist"),
        (["evaluate", "/does/not/exist.pt"], "does not exist"),
        (["train", "--preset", "synthetic", "oops"], "key=value"),
        (["baseline", "--preset", "synthetic", "model.backbone=no_such_vit"], "unknown backbone"),
        (["prepare", "--preset", "synthetic"], "five-crop sets"),
        (["prepare", "--preset", "cityscapes27"], "data.root is not set"),
        (["demo", "--quick", "train.batch_size=1"], "batch_size must be at least 2"),
        (["config", "--preset", "synthetic", "train.precision=fp8"], "train.precision"),
        (["segment", "/does/not/exist.pt", "/no/images/here", "--out", "/tmp/hpseg-x"], "no input images matched"),
        (["name", "/does/not/exist", "0=sky"], "does not exist"),
        (["report", "/does/not/exist"], "no results.json"),
        (["export", "/does/not/exist.pt", "--out", "/tmp/hpseg-x.onnx"], "does not exist"),
        (["convert", "/does/not/exist.pth", "/tmp/hpseg-x.pt"], "does not exist"),
        (["compare", "/does/not/exist"], "no results.json"),
        (["sweep-k", "--k", "1", "--preset", "folder", "data.root=/x"], "at least one number of clusters"),
        (["sweep-k", "--k", "4", "--preset", "folder", "data.root=/does/not/exist", "data.n_classes=4"],
         "/does/not/exist"),
    ],
)
def test_user_errors_are_one_line(argv, message, capsys):
    assert main(argv) == 2
    err = _err(capsys)
    assert err.startswith("error: ") and message in err
    assert len(err.splitlines()) == 1 and "Traceback" not in err


def test_wrong_layout_is_one_line_error(tmp_path, capsys):
    (tmp_path / "cocostuff").mkdir()
    assert main(["train", "--preset", "cocostuff27", f"data.root={tmp_path}", "data.five_crop=false"]) == 2
    err = _err(capsys)
    assert err.startswith("error: ") and len(err.splitlines()) == 1


def test_prepare_writes_five_crop_layout(tmp_path, capsys):
    tree = make_cocostuff_tree(tmp_path)
    assert main(["prepare", "--preset", "cocostuff27", f"data.root={tree.root}", "train.progress=false"]) == 0
    out = tmp_path / "cropped" / "cocostuff27_five_crop_0.5"
    n_train = len(tree.splits["train"])
    assert len(list((out / "img" / "train").glob("*.jpg"))) == 5 * n_train
    assert len(list((out / "label" / "train").glob("*.png"))) == 5 * n_train
    assert "five-crop train set ready" in capsys.readouterr().out


def test_folder_training_with_and_without_labels(tmp_path, tiny_backbone_file, capsys):
    for with_labels in (True, False):
        root = tmp_path / f"imgs_{with_labels}"
        make_folder_tree(root, with_labels=with_labels)
        run = tmp_path / f"run_{with_labels}"
        argv = ["train", "data.dataset=folder", f"data.root={root}", "data.n_classes=3", "data.resolution=32",
                "data.eval_resolution=32", "data.num_workers=0", f"model.weights={tiny_backbone_file}", "model.dim=8",
                "train.batch_size=2", "train.epochs=1", "train.progress=false", "loss.pool_size=3",
                f"train.out_dir={run}"]
        assert main(argv) == 0, _err(capsys)
        assert (run / "best.pt").is_file()
        # settings may follow options: evaluate RUN --baseline key=value
        assert main(["evaluate", str(run), "--baseline", "eval.batch_size=1"]) == 0
        out = capsys.readouterr().out
        assert "protocol:" in out and "nan" not in out.lower()
        doc = json.loads((run / "eval" / "results.json").read_text())
        assert doc["protocol"]["n_classes"] == 3 and doc["protocol"]["labelled"] is with_labels
        if with_labels:
            assert "k-means baseline" in out and doc["metrics"]["unsupervised"]["miou"] >= 0
        else:  # nothing to score against: said so, no metric, still the predictions and the clusters
            assert "no labels to score against" in out and doc["metrics"] == {} and doc["cluster_gallery"]


def test_stray_option_is_rejected(capsys):
    with pytest.raises(SystemExit):
        main(["config", "--preset", "synthetic", "--nonsense"])
    assert "unrecognized arguments: --nonsense" in capsys.readouterr().err


def test_name_refuses_duplicate_ids_and_explains_minus_one(tmp_path, capsys):
    import torch

    from hpseg.backbones import BackboneArch, backbone_from_arch
    from hpseg.checkpoint import load_model, save_checkpoint
    from hpseg.model import HPModel

    torch.manual_seed(0)
    bb = backbone_from_arch(BackboneArch("dino_custom", 8, 64, 1, 1, (4, 4)))
    ckpt = save_checkpoint(tmp_path / "best.pt", HPModel.create(bb, dim=8, n_classes=3, n_clusters=3,
                                                                 class_names=["a", "b", "c"]))
    assert main(["name", str(ckpt), "0=sky", "0=sea"]) == 2
    err = _err(capsys)
    assert "cluster 0 is named twice" in err and len(err.strip().splitlines()) == 1
    assert main(["name", str(ckpt), "-1=void"]) == 2  # not an argparse error: the id is explained
    err = _err(capsys)
    assert "cluster -1 does not exist" in err and "clusters 0..2" in err
    assert main(["name", str(ckpt), "2=sand", "-1=void"]) == 2 and load_model(ckpt).cluster_names is None
    assert main(["name", str(ckpt)]) == 2 and "no cluster names given" in _err(capsys)


def test_errors_from_dataloader_workers_print_their_last_line_only():
    from hpseg.cli.main import _one_line
    from hpseg.errors import UnreadableFileError

    wrapped = UnreadableFileError("Caught UnreadableFileError in DataLoader worker process 0.\nOriginal Traceback "
                                  "(most recent call last):\n  File \"x.py\", line 1, in f\nhpseg.errors."
                                  "UnreadableFileError: cannot read a.jpg (truncated): the file is damaged")
    assert _one_line(wrapped) == "cannot read a.jpg (truncated): the file is damaged"
    assert _one_line(UnreadableFileError("one line")) == "one line"


def test_train_again_on_a_finished_run_says_so_and_a_failed_start_leaves_nothing(tmp_path, tiny_backbone_file,
                                                                                  capsys):
    root = tmp_path / "imgs"
    make_folder_tree(root, with_labels=False)
    run = tmp_path / "run"
    argv = ["train", "data.dataset=folder", f"data.root={root}", "data.n_classes=3", "data.resolution=32",
            "data.eval_resolution=32", "data.num_workers=0", f"model.weights={tiny_backbone_file}", "model.dim=8",
            "train.batch_size=2", "train.epochs=1", "train.progress=false", "loss.pool_size=3",
            f"train.out_dir={run}"]
    assert main(argv) == 0, _err(capsys)
    capsys.readouterr()
    stamp = (run / "best.pt").stat().st_mtime_ns, (run / "train_summary.json").read_bytes()
    assert main(argv) == 0
    assert f"{run} already holds this finished run: nothing was changed" in capsys.readouterr().out
    assert ((run / "best.pt").stat().st_mtime_ns, (run / "train_summary.json").read_bytes()) == stamp
    one = tmp_path / "one"
    one.mkdir()
    (root / "a.jpg").rename(one / "a.jpg")
    argv[2], argv[-1] = f"data.root={one}", f"train.out_dir={tmp_path / 'run1'}"
    assert main(argv) == 2
    assert "training needs at least two images" in _err(capsys) and not (tmp_path / "run1").exists()
