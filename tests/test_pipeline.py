"""Run level: seeds into RUN/seed-<n>/ with mean ± std, the protocol block, DINOv2 end to end."""

from __future__ import annotations

import json

import pytest
import torch

from hpseg.checkpoint import load_model
from hpseg.config import build_config
from hpseg.pipeline import evaluate_path, run_training

TINY = [
    "data.synthetic_train_images=8",
    "data.synthetic_val_images=4",
    "data.synthetic_classes=3",
    "data.num_workers=0",
    "model.dim=8",
    "train.batch_size=4",
    "train.epochs=1",
    "train.progress=false",
    "loss.pool_size=8",
    "loss.warmup=0",
    "eval.batch_size=4",
    "eval.n_gallery=1",
]


def test_seeds_run_and_aggregate(tmp_path, tiny_backbone_file, capsys):
    cfg = build_config("synthetic", [*TINY, "data.resolution=32", "data.eval_resolution=32",
                                     f"model.weights={tiny_backbone_file}", "model.backbone=dino_vits8",
                                     "seeds=[0,1]", f"train.out_dir={tmp_path / 'run'}"])
    folders = run_training(cfg).folders
    assert [f.name for f in folders] == ["seed-0", "seed-1"]
    for f in folders:
        saved = (f / "config.yaml").read_text()
        assert f"seed: {f.name[-1]}" in saved  # each seed's folder records its own seed
    w0 = torch.load(folders[0] / "best.pt", weights_only=True)["state_dict"]
    w1 = torch.load(folders[1] / "best.pt", weights_only=True)["state_dict"]
    assert any(not torch.equal(w0[k], w1[k]) for k in w0 if k.startswith("head."))  # seeds differ

    report = evaluate_path(tmp_path / "run")
    doc = json.loads((tmp_path / "run" / "results.json").read_text())
    assert set(doc["seeds"]) == {"seed-0", "seed-1"}
    agg = doc["metrics"]["unsupervised"]  # multi-seed: the mean ± std over seeds
    vals = [doc["seeds"][s]["unsupervised"]["miou"] for s in ("seed-0", "seed-1")]
    assert agg["miou"] == pytest.approx(sum(vals) / 2)
    assert agg["miou_std"] == pytest.approx(abs(vals[0] - vals[1]) / 2**0.5)
    assert "[seed-0]" in report.summary() and "[mean ± std]" in report.summary() and "±" in report.summary()
    protocol = doc["protocol"]
    assert protocol["dataset"] == "synthetic" and protocol["n_classes"] == 3 and protocol["n_clusters"] == 3
    assert set(protocol["checkpoints"]) == {"seed-0", "seed-1"}
    assert "protocol: synthetic" in report.summary()


def test_overclustering_reports_assignment(tmp_path, tiny_backbone_file):
    cfg = build_config("synthetic", [*TINY, "data.resolution=32", "data.eval_resolution=32",
                                     f"model.weights={tiny_backbone_file}", "model.n_clusters=6",
                                     "train.max_iters=1", f"train.out_dir={tmp_path / 'run'}"])
    run_training(cfg)
    model = load_model(tmp_path / "run" / "best.pt")
    assert model.cluster_probe.clusters.shape[0] == 6
    for matching in ("hungarian", "majority"):
        rep = evaluate_path(tmp_path / "run" / "best.pt", [f"eval.matching={matching}"], out_dir=tmp_path / matching)
        m = rep.metrics["unsupervised"].to_dict()
        assert len(m["assignment"]) == 6
        if matching == "hungarian":  # one-to-one: 3 clusters stay unmatched
            assert sorted(m["assignment"]).count(-1) == 3
        assert rep.protocol.n_clusters == 6 and matching in rep.protocol.matching


def test_dinov2_with_registers_end_to_end(tmp_path):
    """A random-weight patch-14 timm ViT with 4 register tokens: train → evaluate → predict."""
    cfg = build_config("synthetic", [*TINY, "data.resolution=56", "data.eval_resolution=56",
                                     "model.backbone=vit_small_patch14_reg4_dinov2", "model.pretrained=false",
                                     "train.max_iters=2", "loss.chunk_images=2", f"train.out_dir={tmp_path / 'run'}"])
    run_training(cfg)
    model = load_model(tmp_path / "run" / "best.pt")
    assert model.backbone.patch_size == 14 and model.backbone.num_registers == 4
    images = torch.randn(2, 3, 56, 56)
    enc = model.encode(images)
    assert enc["feats"].shape == (2, 384, 4, 4)  # grid follows the patch size; registers excluded
    assert enc["attn_logits"].shape == (2, 6, 17, 17)  # CLS + 16 patches, no registers
    pred = model.predict(images, size=(56, 56))
    assert pred["linear"].shape == (2, 3, 56, 56) and pred["cluster"].shape == (2, 3, 56, 56)
    rep = evaluate_path(tmp_path / "run" / "best.pt", out_dir=tmp_path / "eval")
    assert rep.protocol.backbone == "vit_small_patch14_reg4_dinov2"
    # segment an image whose size is not a multiple of 14, larger than the training window
    from hpseg import Segmenter

    seg = Segmenter.from_checkpoint(tmp_path / "run" / "best.pt", device="cpu")
    image = torch.rand(3, 61, 90)
    labels = seg.predict(image)
    assert labels.shape == (61, 90)
    assert labels.max() < 3 and labels.min() >= -1


# --- a user's folder: unreadable files, finished runs, names, failed starts --------------------


def _folder(root, n: int, *, damaged: bool = False):
    """``n`` small photos under ``root`` (+ a truncated JPEG and a text file named .jpg)."""
    import numpy as np
    from PIL import Image

    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (24, 32, 3), dtype=np.uint8)).save(root / f"p{i}.jpg")
    if damaged:
        data = (root / "p0.jpg").read_bytes()
        (root / "cut.jpg").write_bytes(data[: len(data) // 3])
        (root / "notes.jpg").write_text("not an image")
    return root


def _folder_config(root, out, *extra: str):
    return build_config(None, ["data.dataset=folder", f"data.root={root}", "data.n_classes=3", "data.resolution=32",
                               "data.eval_resolution=32", "data.num_workers=0", "model.pretrained=false",
                               "model.dim=8", "train.batch_size=2", "train.epochs=1", "train.progress=false",
                               "loss.pool_size=4", "loss.warmup=0", f"train.out_dir={out}", *extra])


@pytest.fixture(scope="module")
def folder_run(tmp_path_factory, tiny_backbone_file):
    """A finished run on 4 photos among which 2 files cannot be read (threshold raised to 0.5)."""
    work = tmp_path_factory.mktemp("own")
    photos = _folder(work / "photos", 4, damaged=True)
    cfg = _folder_config(photos, work / "run", f"model.weights={tiny_backbone_file}", "data.max_skipped_fraction=0.5")
    run = run_training(cfg)
    return cfg, run, work


def test_unreadable_images_are_left_out_and_listed(folder_run):
    cfg, run, work = folder_run
    assert run.folders == [work / "run"] and run.finished_before == []
    listed = (work / "run" / "skipped.txt").read_text().splitlines()
    assert sorted(line.split("\t")[0].rsplit("/", 1)[-1] for line in listed) == ["cut.jpg", "notes.jpg"]
    assert json.loads((work / "run" / "train_summary.json").read_text())["iterations"] == 2  # 4 images, batch 2


def test_rerunning_a_finished_run_changes_nothing(folder_run):
    from hpseg.pipeline import name_clusters

    cfg, _, work = folder_run
    run = work / "run"
    name_clusters(run, {0: "sky", 1: "sea", 2: "sand"})
    before = {f: (run / f).read_bytes() for f in ("best.pt", "final.pt", "train_summary.json", "config.yaml",
                                                    "metrics.jsonl")}
    again = run_training(cfg)
    assert again.finished_before == [run]
    assert {f: (run / f).read_bytes() for f in before} == before
    assert load_model(run / "best.pt").cluster_names == ["sky", "sea", "sand"]


def test_naming_updates_only_the_ids_given(folder_run):
    from hpseg.errors import HPSegError
    from hpseg.pipeline import name_clusters

    run = folder_run[2] / "run"
    name_clusters(run, {0: "sky", 1: "sea", 2: "sand"})
    name_clusters(run, {1: "foliage"})
    assert load_model(run / "final.pt").cluster_names == ["sky", "foliage", "sand"]
    with pytest.raises(HPSegError, match=r"cluster -1 does not exist.*no class"):
        name_clusters(run, {-1: "void"})


def test_a_changed_setting_on_a_finished_run_names_it_and_a_new_folder(folder_run):
    from hpseg.errors import HPSegError

    cfg, _, work = folder_run
    changed = _folder_config(cfg.data.root, work / "run", f"model.weights={cfg.model.weights}",
                             "data.max_skipped_fraction=0.5", "model.n_clusters=4")
    with pytest.raises(HPSegError, match=r"finished run with other settings \(model.n_clusters None → 4\).*"
                                         r"train.out_dir=.*run-k4") as err:
        run_training(changed)
    assert "\n" not in str(err.value)


def test_failed_starts_leave_nothing_behind(tmp_path, tiny_backbone_file):
    from hpseg.errors import HPSegError

    one = _folder(tmp_path / "one", 1)
    with pytest.raises(HPSegError, match="at least two images"):
        run_training(_folder_config(one, tmp_path / "run1", f"model.weights={tiny_backbone_file}"))
    assert not (tmp_path / "run1").exists()
    damaged = _folder(tmp_path / "damaged", 4, damaged=True)  # 2 of 6 unreadable > 10 %
    with pytest.raises(HPSegError, match=r"2 of 6 images .* cannot be read .*data.max_skipped_fraction"):
        run_training(_folder_config(damaged, tmp_path / "run2", f"model.weights={tiny_backbone_file}"))
    assert not (tmp_path / "run2").exists()


def test_folder_holdout_is_never_trained_on_and_stable(tmp_path) -> None:
    from PIL import Image

    from hpseg.pipeline import build_train_set, build_val_set, holdout_indices

    photos = tmp_path / "photos"
    photos.mkdir()
    for i in range(10):
        Image.new("RGB", (16, 16), (i * 20, 0, 0)).save(photos / f"p{i}.png")
    cfg = build_config("folder", [f"data.root={photos}", "data.n_classes=3", "data.resolution=16",
                                  "data.eval_resolution=16"])
    train, val = build_train_set(cfg), build_val_set(cfg)
    train_names = {train.name(i) for i in range(len(train))}
    val_names = {val.name(i) for i in range(len(val))}
    assert len(val_names) == 2 and not train_names & val_names and len(train_names | val_names) == 10
    names = sorted(train_names | val_names)
    _, held = holdout_indices(names, 0.2)
    _, held_more = holdout_indices([*names, "q0", "q1", "q2"], 0.2)  # adding photos moves few held-out ones
    assert {names[i] for i in held} & {([*names, "q0", "q1", "q2"])[i] for i in held_more}
    everything = build_config("folder", [f"data.root={photos}", "data.n_classes=3", "data.holdout=0"])
    assert len(build_train_set(everything)) == len(build_val_set(everything)) == 10
