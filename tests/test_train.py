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

    # "interrupted" after 2 of 6 iterations (a killed run writes neither final.pt nor its summary; a
    # finished run is never retrained): a second call resumes from last.pt and finishes
    (run / "final.pt").unlink()
    (run / "train_summary.json").unlink()
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
    with pytest.raises(HPSegError, match=r"other settings \(loss\.tau 0\.8 → 0\.5\)"):
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
        # fp32: on a GPU the dense path would otherwise take float16 products and the sparse float32
        cfg = tiny_cfg("train.max_iters=2", "loss.rho=0.3", f"loss.path={path}", f"train.out_dir={tmp_path / path}",
                       "train.precision=fp32")
        train_one(cfg, tmp_path / path)
        logged = [json.loads(line) for line in (tmp_path / path / "metrics.jsonl").read_text().splitlines()]
        assert {r["train_path"] for r in logged if "train_path" in r} == {path}  # the option reached the loss
        states[path] = torch.load(tmp_path / path / "last.pt", weights_only=True)["model"]
    assert states["dense"].keys() == states["sparse"].keys()
    for k, dense in states["dense"].items():
        torch.testing.assert_close(states["sparse"][k], dense, rtol=1e-4, atol=1e-5, msg=k)


# ------------------------------------------------------------------------------------------
# no host synchronisation inside a training step (docs/DEVELOPING.md: device-agnostic, no sync)
# ------------------------------------------------------------------------------------------

#: aten operations that read a value back to the host, or whose output size depends on values
#: (a GPU must finish its queue first): none may run inside a training step on the CUDA path.
_SYNCING_OPS = ("_local_scalar_dense", "nonzero", "masked_select", "unique", "item", "boolean-mask-index",
                "host-data-to-device")


def _tiny_step_parts(tiny_cfg, *extra: str):
    from hpseg.hidden_positives import HiddenPositiveLoss
    from hpseg.pipeline import build_model
    from hpseg.runtime import Runtime
    from hpseg.train import HPObjective, Optimizers, ReferencePools

    cfg = tiny_cfg("model.dropout=0.1", *extra)
    torch.manual_seed(0)
    model = build_model(cfg, 3, ["a", "b", "c"])
    runtime = Runtime.create("cpu", "fp32")
    loss = HiddenPositiveLoss(0.8, 0.2, path="dense", seed=3)  # the path a GPU takes
    objective = HPObjective(model, loss, alpha=0.05, sigma=28.0)
    optimizers = Optimizers(model, cfg.train, fused=True)  # as on CUDA
    pools = ReferencePools(8, 0.1, torch.Generator().manual_seed(0))
    pools.agnostic = torch.nn.functional.normalize(torch.randn(8, model.backbone.embed_dim), dim=1)
    pools.specific = torch.nn.functional.normalize(torch.randn(8, 8), dim=1)
    gen = torch.Generator().manual_seed(1)
    batch = {"img": torch.randn(4, 3, 32, 32, generator=gen), "img_aug": torch.randn(4, 3, 32, 32, generator=gen),
             "label": torch.randint(-1, 3, (4, 32, 32), generator=gen)}
    return model, objective, optimizers, pools, batch, runtime


def test_training_step_reads_nothing_back_to_the_host(tiny_cfg, monkeypatch):
    """CPU stand-in for ``torch.cuda.set_sync_debug_mode("error")``: every aten operation of a
    step on the dense path (with the negatives drawn by the torch implementation that runs on GPUs)
    is recorded; none may read a value back or depend on one. A defect such as ``float(loss)``,
    ``.tolist()`` of the statistics or a boolean-mask index in the step makes this fail."""
    from torch.utils._python_dispatch import TorchDispatchMode

    import hpseg.hidden_positives.negatives as negatives
    from hpseg.train import train_step

    real_draw = negatives._draw
    monkeypatch.setattr(negatives, "_draw", lambda *a, **k: real_draw(*a, **{**k, "use_numpy": False}))
    model, objective, optimizers, pools, batch, runtime = _tiny_step_parts(tiny_cfg)
    scaler = runtime.grad_scaler()
    for it in range(2):  # warm-up: caches of constants are filled once, outside the checked steps
        train_step(objective, model, batch, pools, 0.5, optimizers, scaler, runtime, ema_m=0.99, step=it)

    seen: list[str] = []

    class Record(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            op = func.overloadpacket.__name__
            seen.append(op)
            if op in ("index", "index_put", "index_put_") and any(
                i is not None and i.dtype == torch.bool for i in args[1]
            ):
                seen.append("boolean-mask-index")  # its size depends on the mask's values
            if op in ("lift_fresh", "lift_fresh_copy") and args[0].dim() > 0:
                seen.append("host-data-to-device")  # torch.tensor([...]) copied in every step
            return func(*args, **(kwargs or {}))

    host_reads: list[str] = []
    for method in ("tolist", "numpy", "item"):
        real = getattr(torch.Tensor, method)
        monkeypatch.setattr(torch.Tensor, method, lambda self, *a, _m=method, _r=real, **k: (host_reads.append(_m),
                                                                                              _r(self, *a, **k))[1])
    with Record():
        out = train_step(objective, model, batch, pools, 0.5, optimizers, scaler, runtime, ema_m=0.99, step=2)
    monkeypatch.undo()
    assert len(seen) > 100  # the step really ran under the recorder
    syncing = sorted({op for op in seen if op in _SYNCING_OPS})
    assert syncing == [], f"host synchronisation inside the training step: {syncing}"
    assert host_reads == []
    assert isinstance(out.loss, torch.Tensor) and bool(out.finite)
    assert set(out.values()) == {"loss", "loss_hp", "loss_consistency", "loss_linear", "loss_cluster", "grad_norm"}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: torch.cuda.set_sync_debug_mode")
def test_training_step_does_not_synchronise_on_cuda(tiny_cfg):
    from hpseg.train import train_step

    model, objective, optimizers, pools, batch, _ = _tiny_step_parts(tiny_cfg)
    from hpseg.runtime import Runtime

    runtime = Runtime.create("cuda", "fp16")
    model.cuda()
    from hpseg.train import Optimizers

    optimizers = Optimizers(model, tiny_cfg().train)
    pools.agnostic, pools.specific = pools.agnostic.cuda(), pools.specific.cuda()
    scaler = runtime.grad_scaler()
    for it in range(2):
        train_step(objective, model, batch, pools, 0.5, optimizers, scaler, runtime, ema_m=0.99, step=it)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for it in range(2, 5):
            train_step(objective, model, batch, pools, 0.5, optimizers, scaler, runtime, ema_m=0.99, step=it)
    finally:
        torch.cuda.set_sync_debug_mode(0)


def test_non_finite_loss_stops_before_anything_is_saved(tiny_cfg, tmp_path, monkeypatch):
    """The finiteness check is deferred to log and save points (no sync per step), but a
    non-finite loss still stops the run with a one-line error before any file is written with it."""
    import hpseg.train as train_module

    real = train_module.train_step
    calls = {"n": 0}

    def poisoned(*args, **kwargs):
        out = real(*args, **kwargs)
        calls["n"] += 1
        if calls["n"] == 3:
            out.loss = out.loss * float("nan")
        return out

    monkeypatch.setattr(train_module, "train_step", poisoned)
    cfg = tiny_cfg("train.log_freq=100")  # the check comes from the validation after iteration 3
    with pytest.raises(HPSegError, match="non-finite loss at iteration 2"):
        train_one(cfg, tmp_path / "run")
    saved = torch.load(tmp_path / "run" / "last.pt", weights_only=True)
    assert saved["state"]["iteration"] == 2  # the validation at iteration 2 saved; nothing after it


def test_seeded_items_seed_a_wrapped_subset_too():
    """A wrapped dataset's ``__getitems__`` (torch's Subset has one) must not let the DataLoader
    fetch a batch around the per-item seeding."""
    from torch.utils.data import DataLoader, Subset

    class Noisy(torch.utils.data.Dataset):
        def __len__(self):
            return 4

        def __getitem__(self, i):
            return torch.rand(1) + i

    wrapped = SeededItems(Subset(Noisy(), [0, 1, 2, 3]))
    assert not hasattr(wrapped, "__getitems__")
    keys = [(0, 5), (1, 6)]
    a = next(iter(DataLoader(wrapped, batch_size=2, sampler=keys)))
    b = next(iter(DataLoader(wrapped, batch_size=2, sampler=keys)))
    assert torch.equal(a, b)  # each item a function of its seed


def test_fit_keys_the_negatives_by_run_seed_and_iteration(tiny_cfg, tmp_path, monkeypatch):
    """The loop's wiring of the negatives draw: every step passes its own iteration, the loss
    carries the run's seed (per rank), so the draw is fresh each step and differs between seeds."""
    from hpseg.hidden_positives import HiddenPositiveLoss
    from hpseg.train import negatives_seed

    calls: list[tuple[int, int]] = []
    real = HiddenPositiveLoss.forward

    def spy(self, *args, **kwargs):
        calls.append((self.seed, kwargs["step"]))
        return real(self, *args, **kwargs)

    monkeypatch.setattr(HiddenPositiveLoss, "forward", spy)
    train_one(tiny_cfg("train.max_iters=4", "loss.rho=0.3", "train.seed=7"), tmp_path / "run")
    assert [step for _, step in calls] == [0, 1, 2, 3]
    assert {seed for seed, _ in calls} == {negatives_seed(7, 0)}
    assert negatives_seed(7, 0) != negatives_seed(8, 0) and negatives_seed(7, 0) != negatives_seed(7, 1)
