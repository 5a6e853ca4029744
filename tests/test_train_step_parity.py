"""Training-step parity with the authors' ``run.py``: K = 5 consecutive steps recorded in
``tests/golden/train_steps.pt`` (see ``tests/golden/README.md`` for the exact settings).

hpseg runs the same steps from the same initial weights, inputs and reference pools, and must
reproduce, step by step: λ, the four loss terms and their total, the gradient norm before
clipping (and whether clipping acted), and every trainable tensor after the step (segmentation
head, EMA head, projection head, linear probe, cluster probe).

Tolerances (float32 on CPU): loss terms 1e-5 relative; gradient norm 1e-5 relative; parameters
and step-0 activations 1e-5 absolute; backbone features and attention logits 1e-4 absolute (a
different ViT implementation, timm's, as in the other golden tests).
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

from hpseg.backbones import build_backbone
from hpseg.config import TrainConfig
from hpseg.hidden_positives import lambda_schedule, local_propagation
from hpseg.model import HPModel
from hpseg.runtime import Runtime
from hpseg.train import (
    HiddenPositiveLoss,
    HPObjective,
    Optimizers,
    ReferencePools,
    flatten_patches,
    train_step,
)

GOLDEN = "train_steps.pt"
DEVICE = torch.device("cpu")
LOSS_RTOL = 1e-5
PARAM_ATOL = 1e-5

# authors' key prefix -> hpseg module path (heads.py docstring)
HEAD_KEYS = {
    "cluster1.0.": "head.linear.",
    "cluster2.": "head.nonlinear.",
    "ema_model1.0.": "ema_head.linear.",
    "ema_model2.": "ema_head.nonlinear.",
}
LOSS_TERMS = ("loss_hp", "loss_consistency", "loss_linear", "loss_cluster")


def _rename_head(key: str) -> str:
    for old, new in HEAD_KEYS.items():
        if key.startswith(old):
            return new + key[len(old) :]
    raise KeyError(f"unexpected head key {key!r} in the golden recording")


def _authors_state_to_hpseg(
    heads: dict[str, torch.Tensor],
    project_head: dict[str, torch.Tensor],
    linear_model: dict[str, torch.Tensor],
    cluster_model: dict[str, torch.Tensor],
) -> dict[str, torch.Tensor]:
    """The trainable tensors in hpseg's ``HPModel.state_dict()`` naming."""
    out = {_rename_head(k): v for k, v in heads.items()}
    out.update({f"projection.linear.{k}": v for k, v in project_head.items()})
    out.update({f"linear_probe.{k}": v for k, v in linear_model.items()})
    out["cluster_probe.clusters"] = cluster_model["clusters"]
    return out


def _build_model(g: dict[str, Any]) -> HPModel:
    s = g["settings"]
    backbone = build_backbone("dino_custom", state_dict=g["initial"]["backbone"], num_heads=s["num_heads"])
    model = HPModel.create(
        backbone, dim=s["dim"], n_classes=s["n_classes"], n_clusters=s["n_clusters"], dropout=s["dropout"]
    )
    init = g["initial"]
    state = _authors_state_to_hpseg(
        init["net_model_heads"], init["project_head"], init["linear_model"], init["cluster_model"]
    )
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected
    assert all(k.startswith("backbone.") for k in missing), missing
    return model.to(DEVICE)


def _objective(model: HPModel, s: dict[str, Any]) -> HPObjective:
    loss = HiddenPositiveLoss(s["tau"], s["rho"], reweight=bool(s["reweighting"]))
    return HPObjective(model, loss, alpha=s["alpha"], sigma=s["sigma"])


def _optimizers(model: HPModel, s: dict[str, Any]) -> Optimizers:
    """hpseg's four optimisers, configured as the recording's."""
    train = TrainConfig(lr_head=s["lr_net"], weight_decay=s["weight_decay_net"], lr_projection=s["lr_projection"],
                        lr_linear=s["lr_linear"], lr_cluster=s["lr_cluster"], grad_clip=s["grad_norm"])
    return Optimizers(model, train)


def _trainable_state(model: HPModel) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items() if not k.startswith("backbone.")}


@torch.no_grad()
def _step0_activations(
    model: HPModel, batch: dict[str, torch.Tensor], s: dict[str, Any]
) -> dict[str, torch.Tensor]:
    """hpseg's activations of step 0 from the initial weights (dropout p = 0: deterministic)."""
    out = model.backbone(batch["img"])
    feats_aug = model.backbone(batch["img_aug"], with_attention=False).feats
    code = model.head(out.feats)
    code_lhp = local_propagation(out.attn_logits, code, sigma=s["sigma"])
    return {
        "feats": out.feats,
        "attn_logits": out.attn_logits,
        "feats_aug": feats_aug,
        "code": code,
        "code_ema": model.ema_head(out.feats),
        "code_lhp": code_lhp,
        "code_aug": model.head(feats_aug),
        "z": model.projection(flatten_patches(code)),
        "z_lhp": model.projection(flatten_patches(code_lhp)),
        "z_aug": model.projection(flatten_patches(model.head(feats_aug))),
    }


@pytest.fixture(scope="module")
def golden(load_golden) -> dict[str, Any]:
    return load_golden(GOLDEN)


@pytest.fixture(scope="module")
def hpseg_run(golden: dict[str, Any]) -> dict[str, Any]:
    """hpseg's K steps on the recorded inputs: per-step values and trainable state after each."""
    s = golden["settings"]
    torch.manual_seed(s["seed"])
    model = _build_model(golden)
    model.train()
    objective = _objective(model, s)
    optimizers = _optimizers(model, s)
    runtime = Runtime.create(DEVICE, "fp32")
    scaler = runtime.grad_scaler()  # disabled in fp32, as the authors' GradScaler off CUDA
    pools = ReferencePools(0, 0.0, torch.Generator())
    pools.agnostic = golden["pools"]["pool_agnostic"].to(DEVICE)
    pools.specific = golden["pools"]["pool_specific"].to(DEVICE)
    batches = [
        {
            "img": x["img"].to(DEVICE),
            "img_aug": x["img_aug"].to(DEVICE),
            "label": x["label"].long().to(DEVICE),
        }
        for x in golden["inputs"]
    ]
    step0 = _step0_activations(model, batches[0], s)
    steps = []
    for it, batch in enumerate(batches):
        lam = lambda_schedule(it, s["warmup"], s["maxiter"])
        out = train_step(objective, model, batch, pools, lam, optimizers, scaler, runtime, ema_m=s["ema_m"])
        steps.append({"lmbd": lam, "loss_total": out.loss, **out.parts, "grad_norm": out.grad_norm,
                      "state": _trainable_state(model)})
    return {"step0": step0, "steps": steps}


def _golden_state(step: dict[str, Any]) -> dict[str, torch.Tensor]:
    return _authors_state_to_hpseg(
        {**step["head"], **step["ema_head"]},
        step["project_head"],
        step["linear_model"],
        step["cluster_model"],
    )


STEPS = range(5)


# ------------------------------------------------------------------------------------------
# the recording itself exercises what it should
# ------------------------------------------------------------------------------------------


def test_recording_covers_the_interesting_cases(golden: dict[str, Any]) -> None:
    s, steps = golden["settings"], golden["steps"]
    assert len(steps) == s["steps"] >= 5
    lams = [st["lmbd"] for st in steps]
    assert lams[0] == 0.0 and max(lams) > 0.0  # warm-up, then task-specific positives weigh in
    assert any(st["clipped"] for st in steps) and not all(st["clipped"] for st in steps)
    assert any(st["mask_stats"]["specific_not_agnostic_pairs"] > 0 for st in steps if st["lmbd"] > 0)
    assert any(min(st["mask_stats"]["kept_anchors_per_image"]) < s["spatial_size"] ** 2 for st in steps)
    assert s["ema_m"] < 1 and s["alpha"] > 0 and s["rho"] == 1.0 and s["dropout"] == 0.0


def test_initial_weights_map_onto_hpseg(golden: dict[str, Any]) -> None:
    model = _build_model(golden)
    state = _trainable_state(model)
    init = golden["initial"]
    expected = _authors_state_to_hpseg(
        init["net_model_heads"], init["project_head"], init["linear_model"], init["cluster_model"]
    )
    assert set(state) == set(expected)
    for key, value in expected.items():
        assert torch.equal(state[key], value), key


# ------------------------------------------------------------------------------------------
# step 0 activations (debugging aid: localises a mismatch before the losses)
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "atol"),
    [
        ("feats", 1e-4),
        ("attn_logits", 1e-4),
        ("feats_aug", 1e-4),
        ("code", 1e-5),
        ("code_ema", 1e-5),
        ("code_lhp", 1e-5),
        ("code_aug", 1e-5),
        ("z", 1e-5),
        ("z_lhp", 1e-5),
        ("z_aug", 1e-5),
    ],
)
def test_step0_activations(golden: dict[str, Any], hpseg_run: dict[str, Any], name: str, atol: float) -> None:
    torch.testing.assert_close(hpseg_run["step0"][name], golden["step0"][name], atol=atol, rtol=0)


# ------------------------------------------------------------------------------------------
# per step: λ, losses, gradient norm, clipping, parameters
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("k", STEPS)
def test_lambda_schedule(golden: dict[str, Any], hpseg_run: dict[str, Any], k: int) -> None:
    assert hpseg_run["steps"][k]["lmbd"] == pytest.approx(golden["steps"][k]["lmbd"], abs=1e-12)


@pytest.mark.parametrize("k", STEPS)
@pytest.mark.parametrize("term", (*LOSS_TERMS, "loss_total"))
def test_loss_terms(golden: dict[str, Any], hpseg_run: dict[str, Any], k: int, term: str) -> None:
    ours, theirs = hpseg_run["steps"][k][term], golden["steps"][k][term]
    assert ours == pytest.approx(theirs, rel=LOSS_RTOL, abs=1e-7), f"step {k} {term}: {ours} vs {theirs}"


@pytest.mark.parametrize("k", STEPS)
def test_grad_norm_and_clipping(golden: dict[str, Any], hpseg_run: dict[str, Any], k: int) -> None:
    ours, theirs = hpseg_run["steps"][k]["grad_norm"], golden["steps"][k]["grad_norm"]
    assert ours == pytest.approx(theirs, rel=LOSS_RTOL), f"step {k}: {ours} vs {theirs}"
    assert (ours > golden["settings"]["grad_norm"]) == golden["steps"][k]["clipped"]


@pytest.mark.parametrize("k", STEPS)
@pytest.mark.parametrize("group", ["head.", "ema_head.", "projection.", "linear_probe.", "cluster_probe."])
def test_parameters_after_step(golden: dict[str, Any], hpseg_run: dict[str, Any], k: int, group: str) -> None:
    expected = {n: v for n, v in _golden_state(golden["steps"][k]).items() if n.startswith(group)}
    assert expected
    ours = hpseg_run["steps"][k]["state"]
    for name, value in expected.items():
        torch.testing.assert_close(
            ours[name], value, atol=PARAM_ATOL, rtol=0, msg=lambda m, n=name: f"step {k} {n}: {m}"
        )
