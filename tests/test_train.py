"""Training: a few HP iterations on tiny synthetic data, checkpoint, interrupt, resume, evaluate."""

from __future__ import annotations

import json

import pytest
import torch

from hpseg.checkpoint import load_model
from hpseg.config import build_config
from hpseg.data.sampler import EpochSampler, SeededItems
from hpseg.errors import HPSegError
from hpseg.pipeline import evaluate_path, train_one
from hpseg.train import probe_cross_entropy, selection_score

TINY = [
    "data.synthetic_train_images=12",
    "data.synthetic_val_images=4",
    "data.resolution=32",
    "data.eval_resolution=32",
    "data.synthetic_classes=3",
    "model.dim=8",
    "train.batch_size=4",
    "train.epochs=2",
    "train.valid_freq=2",
    "train.log_freq=1",
    "train.progress=false",
    "loss.pool_size=8",
    "loss.warmup=1",
    "loss.renew_interval=2",
    "eval.batch_size=4",
    "eval.n_gallery=2",
]


@pytest.fixture
def tiny_cfg(tmp_path, tiny_backbone_file):
    def make(*extra: str):
        return build_config(
            "synthetic",
            [*TINY, "model.backbone=dino_vits8", f"model.weights={tiny_backbone_file}",
             f"train.out_dir={tmp_path / 'run'}", *extra],
        )

    return make


def test_epoch_sampler_resumes_mid_epoch():
    s = EpochSampler(10, batch_size=3, seed=1)
    s.set_epoch(2)
    full = list(s)
    indices = [i for i, _ in full]
    assert len(full) == 9 and len(set(indices)) == 9  # 3 full batches, incomplete one dropped
    s.set_epoch(2, start_batch=1)
    assert list(s) == full[3:]  # same items and the same augmentation seeds
    s.set_epoch(3)
    assert list(s) != full


def test_epoch_sampler_splits_ranks():
    a = EpochSampler(12, 2, seed=0, rank=0, world=2)
    b = EpochSampler(12, 2, seed=0, rank=1, world=2)
    ia, ib = {i for i, _ in a}, {i for i, _ in b}
    assert not ia & ib and len(ia) == len(ib) == 6


def test_seeded_items_make_augmentation_a_function_of_the_seed():
    class Noisy(torch.utils.data.Dataset):
        def __len__(self):
            return 3

        def __getitem__(self, i):
            return torch.rand(2) + i

    ds = SeededItems(Noisy())
    torch.manual_seed(0)
    state = torch.get_rng_state()
    a = ds[(1, 123)]
    assert torch.equal(torch.get_rng_state(), state)  # the caller's random stream is untouched
    torch.rand(5)  # whatever happened before does not matter
    assert torch.equal(ds[(1, 123)], a) and not torch.equal(ds[(1, 124)], a)


def test_probe_loss_ignores_unlabelled_pixels():
    logits = torch.randn(2, 3, 4, 4, requires_grad=True)
    label = torch.full((2, 8, 8), -1, dtype=torch.long)
    loss = probe_cross_entropy(logits, label)
    assert float(loss.detach()) == 0.0
    loss.backward()
    label[0, :4] = 2
    assert float(probe_cross_entropy(logits, label).detach()) > 0


def test_selection_score_is_authors_sum():
    m = {"unsupervised": {"miou": 1.0, "accuracy": 2.0}, "linear": {"miou": 3.0, "accuracy": 4.0}}
    assert selection_score(m) == 10.0


def test_train_interrupt_resume_evaluate(tiny_cfg, tmp_path):
    cfg = tiny_cfg("train.max_iters=2")
    run = tmp_path / "run"
    summary = train_one(cfg, run)
    assert summary["iterations"] == 2
    for name in ("last.pt", "best.pt", "config.yaml", "metrics.jsonl", "training_curve.png"):
        assert (run / name).is_file(), name
    state = torch.load(run / "last.pt", weights_only=True)
    assert state["state"]["iteration"] == 2

    # "interrupted" after 2 of 6 iterations: a second call resumes from last.pt and finishes
    cfg_full = tiny_cfg()
    cfg_full.train.max_iters = None
    summary = train_one(cfg_full, run)
    assert summary["iterations"] == 6
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    train_iters = [r["iteration"] for r in rows if "val" not in r]
    assert train_iters == sorted(train_iters) and train_iters[-1] == 5
    assert len(set(train_iters)) == len(train_iters)  # no iteration repeated after resuming
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in rows if "loss" in r)

    model = load_model(run / "best.pt")
    assert model.class_names and len(model.class_names) == 3
    results = evaluate_path(run / "best.pt", out_dir=tmp_path / "eval")
    m = results.metrics
    assert 0.0 <= m["unsupervised"].accuracy <= 100.0 and 0.0 <= m["linear"].miou <= 100.0
    assert results.protocol.n_images == 4
    assert "protocol:" in results.summary() and (tmp_path / "eval" / "results.json").is_file()


def test_resume_refuses_a_different_config(tiny_cfg, tmp_path):
    train_one(tiny_cfg("train.max_iters=1"), tmp_path / "run")
    with pytest.raises(HPSegError, match="different"):
        train_one(tiny_cfg("train.max_iters=1", "loss.tau=0.5"), tmp_path / "run")


def test_training_is_deterministic(tiny_cfg, tmp_path):
    a = tiny_cfg("train.max_iters=2", f"train.out_dir={tmp_path / 'a'}")
    b = tiny_cfg("train.max_iters=2", f"train.out_dir={tmp_path / 'b'}")
    train_one(a, tmp_path / "a")
    train_one(b, tmp_path / "b")
    sa = torch.load(tmp_path / "a" / "last.pt", weights_only=True)["model"]
    sb = torch.load(tmp_path / "b" / "last.pt", weights_only=True)["model"]
    for k in sa:
        torch.testing.assert_close(sa[k], sb[k], msg=k)


def test_dense_and_sparse_loss_paths_train_alike(tiny_cfg, tmp_path):
    """`loss.path` changes only how the loss is evaluated: both paths end with the same weights."""
    states = {}
    for path in ("dense", "sparse"):
        cfg = tiny_cfg("train.max_iters=2", "loss.rho=0.3", f"loss.path={path}", f"train.out_dir={tmp_path / path}")
        train_one(cfg, tmp_path / path)
        logged = [json.loads(line) for line in (tmp_path / path / "metrics.jsonl").read_text().splitlines()]
        assert {r["train_path"] for r in logged if "train_path" in r} == {path}  # the option reached the loss
        states[path] = torch.load(tmp_path / path / "last.pt", weights_only=True)["model"]
    assert states["dense"].keys() == states["sparse"].keys()
    for k, dense in states["dense"].items():
        torch.testing.assert_close(states["sparse"][k], dense, rtol=1e-4, atol=1e-5, msg=k)
