"""Training-loop parity with the authors' ``run.py``: the loop recorded in
``tests/golden/train_loop.pt`` (12 iterations over 2 epochs, warm-up ending at iteration 4,
two task-specific pool renewals, four validation points; see ``tests/golden/README.md``).

hpseg's real :func:`hpseg.train.fit` runs on the recorded batches, from the recorded initial
weights, with a configuration holding the recording's settings (none of them hpseg's
defaults, so that a value that does not reach the step shows). Two seams only, both in this
file: the :class:`~hpseg.train.DataPlan` yields the recorded batches and pool passes instead of
its own shuffled order, and the pool-entry sampler takes the patch positions the authors'
``np.random.randint`` drew. Everything else — the λ schedule, when the pools are renewed and
from which head, what the objective and the optimisers are built from, the EMA, the clipping,
the validation points — is ``fit``'s own. It must match, per iteration: λ, the four loss terms,
the gradient norm; the pools after building and after each renewal; the iterations of the
validations and the weights there; every trainable tensor at the end. A run killed mid-epoch
and resumed from its ``last.pt`` must match as well.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar

import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

import hpseg.train as train_module
from hpseg.backbones import build_backbone
from hpseg.config import LossConfig, TrainConfig
from hpseg.model import HPModel
from hpseg.runtime import Runtime

GOLDEN = "train_loop.pt"
LOSS_RTOL = 1e-5
PARAM_ATOL = 1e-5
POOL_ATOL = 1e-5
LOSS_TERMS = ("loss_hp", "loss_consistency", "loss_linear", "loss_cluster")

# authors' key prefix -> hpseg module path (heads.py docstring, tests/golden/README.md)
HEAD_KEYS = {"cluster1.0.": "head.linear.", "cluster2.": "head.nonlinear.",
             "ema_model1.0.": "ema_head.linear.", "ema_model2.": "ema_head.nonlinear."}


def _hpseg_names(snapshot: dict[str, Any]) -> dict[str, torch.Tensor]:
    """A recorded snapshot (authors' names) in ``HPModel.state_dict()`` names."""
    out: dict[str, torch.Tensor] = {}
    for key, value in snapshot["net_model_heads"].items():
        prefix = next(p for p in HEAD_KEYS if key.startswith(p))
        out[HEAD_KEYS[prefix] + key[len(prefix):]] = value
    out.update({f"projection.linear.{k}": v for k, v in snapshot["project_head"].items()})
    out.update({f"linear_probe.{k}": v for k, v in snapshot["linear_model"].items()})
    out["cluster_probe.clusters"] = snapshot["cluster_model"]["clusters"]
    return out


def _trainable(model: HPModel) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items() if not k.startswith("backbone.")}


class _Images(Dataset):
    """The recorded training images (fixed views: no augmentation to match)."""

    def __init__(self, data: dict[str, torch.Tensor]) -> None:
        self.data = data

    def __len__(self) -> int:
        return int(self.data["img"].shape[0])

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"img": self.data["img"][i].float(), "img_aug": self.data["img_aug"][i].float(),
                "label": self.data["label"][i].long()}


def _batches(data: dict[str, torch.Tensor], order: list[int], batch: int) -> Iterator[dict[str, torch.Tensor]]:
    """Batches of ``data`` (float16 images, int8 labels as stored) in ``order``."""
    for k in range(len(order) // batch):
        idx = torch.tensor(order[k * batch : (k + 1) * batch])
        yield {key: v[idx].long() if key == "label" else v[idx].float() for key, v in data.items()}


class _RecordedPlan(train_module.DataPlan):
    """``fit``'s DataPlan, built by its own ``create`` (counts, max_iters), whose batches are the
    recorded ones: epoch ``e`` in the authors' order; for the pools, the recorded pass over the
    pool images (pass 0 builds both pools, then one pass per renewal)."""

    golden: ClassVar[dict[str, Any]]
    log: ClassVar[dict[str, Any]]

    def epoch(self, iteration: int) -> tuple[int, Iterator[dict[str, Any]]]:
        epoch, start = divmod(iteration, self.iters_per_epoch)
        order = self.golden["train_order"][epoch].tolist()[start * self.per_rank :]

        def counted() -> Iterator[dict[str, Any]]:
            for batch in _batches(self.golden["data"], order, self.per_rank):
                self.log["fetched"] += 1
                yield batch

        return epoch, counted()

    def pool_pass(self, k: int) -> Iterator[dict[str, Any]]:
        if k == 0:
            order = self.golden["pools_initial"]["order"]
        else:
            order = self.golden["renewals"][self.log["renewal_passes"]]["order"]
            self.log["renewal_passes"] += 1
        yield from _batches(self.golden["pool_data"], order.tolist(), self.per_rank)
        # more images than the authors' pool took: a pool larger than theirs would read on
        yield from _batches(self.golden["data"], list(range(len(self.golden["data"]["img"]))), self.per_rank)


def _recorded_positions(golden: dict[str, Any]) -> dict[int, list[int]]:
    """Patch positions per pool width, in the order hpseg fills the pools."""
    width, dim = golden["settings"]["width"], golden["settings"]["dim"]
    specific = [golden["pools_initial"]["positions_specific"]] + [r["positions"] for r in golden["renewals"]]
    return {width: golden["pools_initial"]["positions_agnostic"].tolist(),
            dim: torch.cat(specific).tolist()}


def _config(s: dict[str, Any]) -> tuple[TrainConfig, LossConfig]:
    """The recording's settings as hpseg's configuration (the authors' head optimiser lr is
    ``optimizer.net.lr`` for both the segmentation and the projection head)."""
    train = TrainConfig(epochs=s["epochs"], batch_size=s["batch_size"], lr_head=s["lr_net"],
                        weight_decay=s["weight_decay_net"], lr_projection=s["lr_net"], lr_linear=s["lr_linear"],
                        lr_cluster=s["lr_cluster"], grad_clip=s["grad_norm"], precision="fp32",
                        valid_freq=s["valid_freq"], log_freq=1, seed=s["seed"], device="cpu", progress=False)
    loss = LossConfig(tau=s["tau"], rho=s["rho"], alpha=s["alpha"], warmup=s["warmup"], pool_size=s["pool_size"],
                      renew_interval=s["renew_interval"], ema_m=s["ema_m"], sigma=s["sigma"],
                      reweight=bool(s["reweighting"]))
    return train, loss


def _initial_model(golden: dict[str, Any]) -> HPModel:
    s = golden["settings"]
    torch.manual_seed(s["seed"])
    backbone = build_backbone("dino_custom", state_dict=golden["initial"]["backbone"], num_heads=s["num_heads"])
    model = HPModel.create(backbone, dim=s["dim"], n_classes=s["n_classes"], n_clusters=s["n_clusters"],
                           dropout=s["dropout"])
    missing, unexpected = model.load_state_dict(_hpseg_names(golden["initial"]), strict=False)
    assert not unexpected and all(k.startswith("backbone.") for k in missing)
    return model


class _Crash(Exception):
    pass


def run_fit_on_recording(golden: dict[str, Any], out_dir: Path, monkeypatch: pytest.MonkeyPatch,
                         crash_before: int | None = None) -> dict[str, Any]:
    """hpseg's ``fit`` on the recorded loop; returns what it logged, pooled and validated.

    With ``crash_before=k`` the run dies when step ``k`` starts and is run again, as a new
    process would: a fresh model resumes from the run folder's ``last.pt``."""
    s = golden["settings"]
    model = _initial_model(golden)

    seen: dict[str, Any] = {"fetched": 0, "renewal_passes": 0, "renewals": [], "validations": [], "pools": None}
    _RecordedPlan.golden, _RecordedPlan.log = golden, seen
    monkeypatch.setattr(train_module, "DataPlan", _RecordedPlan)
    queues = _recorded_positions(golden)

    def recorded_entries(x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        b = x.shape[0]
        queue = queues[x.shape[1]]
        assert len(queue) >= b, "fit filled a pool with more entries than the authors' pool holds"
        idx, queue[:] = torch.tensor(queue[:b]), queue[b:]
        return F.normalize(x.flatten(2)[torch.arange(b), :, idx].float(), dim=1)

    monkeypatch.setattr(train_module, "sample_pool_entries", recorded_entries)
    real_build, real_renew = train_module.ReferencePools.build, train_module.ReferencePools.renew_specific

    def build(pools: Any, *args: Any, **kwargs: Any) -> None:
        real_build(pools, *args, **kwargs)
        seen["pools"] = {"agnostic": pools.agnostic.clone(), "specific": pools.specific.clone()}

    def renew(pools: Any, *args: Any, **kwargs: Any) -> None:
        real_renew(pools, *args, **kwargs)
        # the batch of this iteration is already fetched: fetched - 1 steps are done
        seen["renewals"].append({"before_iteration": seen["fetched"] - 1, "specific": pools.specific.clone()})

    monkeypatch.setattr(train_module.ReferencePools, "build", build)
    monkeypatch.setattr(train_module.ReferencePools, "renew_specific", renew)

    def validate(m: HPModel, pools: Any) -> dict[str, Any]:
        seen["validations"].append({"iteration": seen["fetched"], "state": _trainable(m)})
        zero = {"miou": 0.0, "accuracy": 0.0}
        return {"unsupervised": zero, "linear": zero, "labelled": True}

    train, loss = _config(s)
    runtime = Runtime.create("cpu", "fp32")
    run = lambda m: train_module.fit(m, _Images(golden["data"]), train=train, loss=loss,  # noqa: E731
                                     runtime=runtime, out_dir=out_dir, config={}, validate=validate)
    if crash_before is not None:
        real_step = train_module.train_step

        def dying(*args: Any, **kwargs: Any) -> Any:
            if seen["fetched"] == crash_before + 1:
                raise _Crash
            return real_step(*args, **kwargs)

        monkeypatch.setattr(train_module, "train_step", dying)
        with pytest.raises(_Crash):
            run(model)
        monkeypatch.setattr(train_module, "train_step", real_step)
        seen["fetched"] = torch.load(out_dir / "last.pt", weights_only=True)["state"]["iteration"]
        model = _initial_model(golden)
    summary = run(model)
    rows = [r for r in map(__import__("json").loads, (out_dir / "metrics.jsonl").read_text().splitlines())
            if "lambda" in r]
    return {"summary": summary, "rows": rows, "final": _trainable(model), "queues": queues, **seen}


@pytest.fixture(scope="module")
def golden(load_golden) -> dict[str, Any]:
    return load_golden(GOLDEN)


@pytest.fixture(scope="module")
def ours(golden: dict[str, Any], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    with pytest.MonkeyPatch.context() as mp:
        return run_fit_on_recording(golden, tmp_path_factory.mktemp("loop"), mp)


@pytest.fixture(scope="module")
def resumed(golden: dict[str, Any], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Killed at iteration 8 (mid-epoch, after the renewal and the validation of epoch 0 and the
    validation at 6), resumed from ``last.pt`` (iteration 6) in a fresh model."""
    with pytest.MonkeyPatch.context() as mp:
        return run_fit_on_recording(golden, tmp_path_factory.mktemp("resumed"), mp, crash_before=8)


ITERS = range(12)


def test_recording_crosses_what_the_loop_decides(golden: dict[str, Any]) -> None:
    s, iters = golden["settings"], golden["iters"]
    per_epoch = s["iters_per_epoch"]
    assert len(iters) == s["iterations"] == per_epoch * s["epochs"] >= 12 and s["epochs"] >= 2
    lams = [r["lmbd"] for r in iters]
    assert lams[0] == 0.0 and 0 < s["warmup"] < per_epoch and max(lams) > 0  # warm-up ends inside the run
    assert [r["before_iteration"] for r in golden["renewals"]]  # at least one renewal
    assert golden["validations"] and s["rho"] == 1.0 and s["dropout"] == 0.0
    # every similarity ≥ 1e-5 from its thresholds: float32 rounding cannot flip a mask
    assert min(min(r["margin_agnostic"], r["margin_specific"]) for r in iters) >= 1e-5
    clipped = [r["grad_norm"] > s["grad_norm"] for r in iters]
    assert any(clipped) and not all(clipped)
    defaults_train, defaults_loss = TrainConfig(), LossConfig()  # every setting differs from hpseg's defaults
    train, loss = _config(s)
    for name in ("tau", "alpha", "warmup", "pool_size", "renew_interval", "ema_m", "sigma", "rho"):
        assert getattr(loss, name) != getattr(defaults_loss, name), name
    for name in ("lr_head", "weight_decay", "lr_projection", "lr_linear", "lr_cluster", "grad_clip", "valid_freq"):
        assert getattr(train, name) != getattr(defaults_train, name), name


def test_fit_ran_the_recorded_iterations(golden: dict[str, Any], ours: dict[str, Any]) -> None:
    assert ours["summary"]["max_iters"] == golden["settings"]["iterations"]
    assert [r["iteration"] for r in ours["rows"]] == list(range(golden["settings"]["iterations"]))
    assert all(not q for q in ours["queues"].values()), "fit drew a different number of pool entries"


@pytest.mark.parametrize("k", ITERS)
def test_lambda_per_iteration(golden: dict[str, Any], ours: dict[str, Any], k: int) -> None:
    assert ours["rows"][k]["lambda"] == pytest.approx(golden["iters"][k]["lmbd"], abs=1e-12)


@pytest.mark.parametrize("k", ITERS)
def test_loss_terms_and_grad_norm_per_iteration(golden: dict[str, Any], ours: dict[str, Any], k: int) -> None:
    theirs, mine = golden["iters"][k], ours["rows"][k]
    for term in (*LOSS_TERMS, "grad_norm"):
        assert mine[term] == pytest.approx(theirs[term], rel=LOSS_RTOL, abs=1e-7), f"iteration {k} {term}"


def test_pools_as_built(golden: dict[str, Any], ours: dict[str, Any]) -> None:
    for which in ("agnostic", "specific"):
        torch.testing.assert_close(ours["pools"][which], golden["pools_initial"][which], atol=POOL_ATOL, rtol=0)


def test_pools_after_each_renewal(golden: dict[str, Any], ours: dict[str, Any]) -> None:
    assert [r["before_iteration"] for r in ours["renewals"]] == [r["before_iteration"] for r in golden["renewals"]]
    for mine, theirs in zip(ours["renewals"], golden["renewals"]):
        torch.testing.assert_close(mine["specific"], theirs["specific"], atol=POOL_ATOL, rtol=0,
                                   msg=lambda m, it=theirs["before_iteration"]: f"renewal before {it}: {m}")


def test_validation_points_and_weights_there(golden: dict[str, Any], ours: dict[str, Any]) -> None:
    assert [v["iteration"] for v in ours["validations"]] == [v["iteration"] for v in golden["validations"]]
    for mine, theirs in zip(ours["validations"], golden["validations"]):
        for name, value in _hpseg_names(theirs).items():
            torch.testing.assert_close(mine["state"][name], value, atol=PARAM_ATOL, rtol=0,
                                       msg=lambda m, n=name, it=theirs["iteration"]: f"validation @{it} {n}: {m}")


@pytest.mark.parametrize("group", ["head.", "ema_head.", "projection.", "linear_probe.", "cluster_probe."])
def test_every_trainable_tensor_at_the_end(golden: dict[str, Any], ours: dict[str, Any], group: str) -> None:
    expected = {n: v for n, v in _hpseg_names(golden["final"]).items() if n.startswith(group)}
    assert expected and set(expected) == {n for n in ours["final"] if n.startswith(group)}
    for name, value in expected.items():
        torch.testing.assert_close(ours["final"][name], value, atol=PARAM_ATOL, rtol=0,
                                   msg=lambda m, n=name: f"{n}: {m}")


def test_a_resumed_run_ends_as_the_authors(golden: dict[str, Any], resumed: dict[str, Any]) -> None:
    assert [r["iteration"] for r in resumed["rows"]] == list(ITERS)
    for k in ITERS:
        assert resumed["rows"][k]["lambda"] == pytest.approx(golden["iters"][k]["lmbd"], abs=1e-12)
        for term in (*LOSS_TERMS, "grad_norm"):
            assert resumed["rows"][k][term] == pytest.approx(golden["iters"][k][term], rel=LOSS_RTOL, abs=1e-7)
    assert [r["before_iteration"] for r in resumed["renewals"]] == [r["before_iteration"] for r in golden["renewals"]]
    assert [v["iteration"] for v in resumed["validations"]] == [v["iteration"] for v in golden["validations"]]
    for name, value in _hpseg_names(golden["final"]).items():
        torch.testing.assert_close(resumed["final"][name], value, atol=PARAM_ATOL, rtol=0,
                                   msg=lambda m, n=name: f"{n}: {m}")
