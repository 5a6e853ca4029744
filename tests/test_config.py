"""Config: presets hold the paper's hyper-parameters; overrides are typed and validated."""

from __future__ import annotations

import pytest
import yaml

from hpseg.config import Config, available_presets, build_config, config_from_dict, require_data_root, run_dir
from hpseg.errors import HPSegError


def test_presets_shipped():
    assert set(available_presets()) >= {"cocostuff27", "cityscapes27", "potsdam3", "synthetic"}


@pytest.mark.parametrize(
    ("preset", "tau", "rho", "alpha", "ema_m", "warmup", "pool", "dim", "backbone"),
    [
        ("cocostuff27", 0.8, 0.02, 0.05, 0.99, 1000, 2048, 512, "dino_vits8"),
        ("cityscapes27", 0.6, 0.02, 0.05, 0.999, 50, 2048, 512, "dino_vits8"),
        ("potsdam3", 0.4, 1.0, 0.0, 0.999, 100, 1024, 256, "dino_vitb8"),
    ],
)
def test_paper_hyperparameters(preset, tau, rho, alpha, ema_m, warmup, pool, dim, backbone):
    cfg = build_config(preset, ["data.root=/data"])
    assert (cfg.loss.tau, cfg.loss.rho, cfg.loss.alpha) == (tau, rho, alpha)
    assert (cfg.loss.ema_m, cfg.loss.warmup, cfg.loss.pool_size) == (ema_m, warmup, pool)
    assert cfg.model.dim == dim and cfg.model.backbone == backbone
    assert cfg.train.batch_size == 64 and cfg.data.resolution == 224 and cfg.data.eval_resolution == 320


def test_overrides_are_typed_and_aliases_work():
    cfg = build_config(
        "cocostuff27",
        ["data.root=/x", "train.batch_size=32", "seeds=[0,1,2]", "backbone=dino_vitb8", "loss.tau=0.5",
         "eval.crf=false", "model.weights=null", "model.n_clusters=40"],
    )
    assert cfg.train.batch_size == 32 and isinstance(cfg.train.batch_size, int)
    assert cfg.train.seeds == [0, 1, 2]
    assert cfg.model.backbone == "dino_vitb8"
    assert cfg.loss.tau == 0.5 and cfg.eval.crf is False and cfg.model.weights is None
    assert cfg.model.n_clusters == 40


def test_scientific_notation_is_a_number():
    """YAML 1.1 reads ``1e-3`` (no dot) as a string; a float setting takes it as Python does."""
    cfg = build_config("synthetic", ["train.lr_head=1e-3", "loss.memory_gb=2E1", "train.weight_decay=5e-2"])
    assert cfg.train.lr_head == 1e-3 and cfg.loss.memory_gb == 20.0 and cfg.train.weight_decay == 0.05
    with pytest.raises(HPSegError, match="expects a number"):
        build_config("synthetic", ["train.lr_head=fast"])


def test_string_values_are_kept_verbatim():
    cfg = build_config("synthetic", ["train.out_dir=0001", "data.root=yes"])
    assert cfg.train.out_dir == "0001" and cfg.data.root == "yes"


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("train.batchsize=3", "did you mean train.batch_size"),
        ("train.batch_size=abc", "expects an integer"),
        ("nonsense=1", "unknown config key"),
        ("loss.rho=2", "loss.rho must lie in [0, 1]"),
        ("eval.crf=maybe", "expects true or false"),
        ("train.batch_size", "is not key=value"),
        ("train.batch_size=1", "at least 2"),
        ("loss.path=fast", "loss.path must be auto, dense, sparse or fused"),
    ],
)
def test_bad_overrides_give_one_line_errors(override, message):
    with pytest.raises(HPSegError) as exc:
        build_config("synthetic", [override])
    assert message in str(exc.value)
    assert "\n" not in str(exc.value)


def test_unknown_preset_and_missing_root():
    with pytest.raises(HPSegError, match="unknown preset 'coco'"):
        build_config("coco", [])
    cfg = build_config("cocostuff27", [])  # a configuration can be printed before the data exists
    with pytest.raises(HPSegError, match="data.root is not set"):
        require_data_root(cfg)


@pytest.mark.parametrize("preset", ["cocostuff27", "cityscapes27", "potsdam3"])
def test_paper_presets_train_as_the_authors(preset):
    cfg = build_config(preset, [])
    assert cfg.train.precision == "fp16" and cfg.data.root is None
    assert cfg.data.five_crop is (preset != "potsdam3")  # the authors' Potsdam loader reads whole tiles
    assert cfg.data.crop_ratio == 0.5


def test_legacy_amp_key_and_run_folder_names():
    assert build_config("synthetic", ["train.amp=false"]).train.precision == "fp32"
    assert config_from_dict({"train": {"amp": True}}).train.precision == "auto"
    assert str(run_dir(build_config("folder", ["data.root=/photos/holiday/"]))) == "runs/holiday"
    assert str(run_dir(build_config("cocostuff27", []))) == "runs/cocostuff27"
    assert str(run_dir(build_config("synthetic", ["train.out_dir=x/y"]))) == "x/y"


def test_round_trip_through_yaml(tmp_path):
    cfg = build_config("potsdam3", ["data.root=/d", "seeds=[3,4]"])
    text = cfg.to_yaml()
    again = config_from_dict(yaml.safe_load(text))
    assert again == cfg
    assert isinstance(again, Config)


def test_preset_from_yaml_file(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text("data:\n  dataset: folder\n  root: /imgs\n  n_classes: 4\nmodel:\n  dim: 32\n")
    cfg = build_config(str(path), [])
    assert cfg.data.dataset == "folder" and cfg.data.n_classes == 4 and cfg.model.dim == 32


def test_run_folders_of_two_data_folders_with_one_name_do_not_collide(tmp_path, monkeypatch):
    from pathlib import Path

    monkeypatch.chdir(tmp_path)
    a, b = tmp_path / "a" / "photos", tmp_path / "b" / "photos"
    cfg_a = build_config("folder", [f"data.root={a}"])
    cfg_b = build_config("folder", [f"data.root={b}"])
    assert run_dir(cfg_a) == run_dir(cfg_b) == Path("runs/photos")  # nothing trained yet
    (tmp_path / "runs" / "photos").mkdir(parents=True)
    (tmp_path / "runs" / "photos" / "config.yaml").write_text(cfg_a.to_yaml())
    assert run_dir(cfg_a) == Path("runs/photos")  # its own run: the same folder again
    other = run_dir(cfg_b)
    assert other.parent == Path("runs") and other.name.startswith("photos-") and len(other.name) == len("photos-") + 6
    assert run_dir(build_config("folder", [f"data.root={b}"])) == other  # stable
