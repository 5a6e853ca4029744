"""``loss.compile=true``: the dense chunk through ``torch.compile`` keeps one graph per λ regime.

λ changes at every iteration after the warm-up. Passed as a Python float, dynamo guards on its
value: every new λ recompiled the chunk and after ``torch._dynamo.config.recompile_limit`` (8)
values compilation silently stopped. λ is now a 0-dim tensor and "with the task-specific term" a
static flag, so a run compiles one graph for λ = 0 and one for every λ ≠ 0 (per chunk shape).
Dynamo's counters (``torch._dynamo.utils.counters``) count the graphs. On CPU the graphs run
through AOTAutograd without code generation (Inductor's C++ build takes a minute here).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest
import torch
import torch._dynamo
import torch.nn.functional as F
from torch._dynamo.utils import counters

import hpseg.hidden_positives.dense as dense
import hpseg.hidden_positives.loss as loss_module
from hpseg.config import build_config
from hpseg.hidden_positives import hidden_positive_loss
from hpseg.pipeline import train_one

#: λ before the warm-up ends (0) and four distinct values after it, then 0 again.
LAMBDAS = (0.0, 0.1, 0.25, 0.5, 0.75, 1.0, 0.0)


def _problem(b: int, s: int, width: int, p: int, seed: int) -> dict[str, torch.Tensor]:
    """L2-normalised inputs with a few shared directions, so that both kinds of positives exist."""
    gen = torch.Generator().manual_seed(seed)
    n = b * s * s

    def unit(*shape: int) -> torch.Tensor:
        return F.normalize(torch.randn(*shape, generator=gen), dim=-1)

    centres_f, centres_s = unit(4, width), unit(4, width)
    label = torch.randint(4, (n,), generator=gen)
    return {
        "z": unit(n, width),
        "z_lhp": unit(n, width),
        "feats": F.normalize(centres_f[label] + 0.6 * torch.randn(n, width, generator=gen), dim=1),
        "code_ema": F.normalize(centres_s[label] + 0.6 * torch.randn(n, width, generator=gen), dim=1),
        "pool_agnostic": unit(p, width),
        "pool_specific": unit(p, width),
    }


def _loss_and_grads(x: dict[str, torch.Tensor], lam: float, compile_chunks: bool) -> tuple[torch.Tensor, ...]:
    z, z_lhp = x["z"].clone().requires_grad_(True), x["z_lhp"].clone().requires_grad_(True)
    loss = hidden_positive_loss(z, z_lhp, x["feats"], x["code_ema"], x["pool_agnostic"], x["pool_specific"],
                                num_images=4, tau=0.8, lam=lam, rho=0.3, path="dense", chunk_images=2, seed=1,
                                step=3, compile_chunks=compile_chunks)
    loss.backward()
    assert z.grad is not None and z_lhp.grad is not None
    return loss.detach(), z.grad, z_lhp.grad


@pytest.fixture
def fresh_dynamo(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Dynamo's caches and counters emptied, the chunk compiled with the ``aot_eager`` backend."""
    monkeypatch.setattr(loss_module, "compiled_dense_chunk_terms", lambda: dense.compiled_dense_chunk_terms("aot_eager"))
    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()


def _graphs() -> int:
    return int(counters["stats"]["unique_graphs"])


def test_compiled_chunk_keeps_two_graphs_over_changing_lambda(fresh_dynamo: None) -> None:
    """Seven calls over λ = 0 and four distinct λ > 0 (every chunk of one shape): two graphs, and
    every call equals the eager reference (a graph compiled for one λ would give another's values)."""
    x = _problem(4, 3, 8, 8, seed=5)
    for lam in LAMBDAS:
        got = _loss_and_grads(x, lam, compile_chunks=True)
        want = _loss_and_grads(x, lam, compile_chunks=False)
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6 * float(w.abs().max()) + 1e-12)
    assert _graphs() == 2, dict(counters["stats"])  # one for λ = 0, one for every λ ≠ 0
    assert counters["frames"]["ok"] == 2


def test_tensor_lambda_gives_the_float_paths_bits() -> None:
    """The compiled path's λ (a 0-dim tensor with the flag) builds ``w = A + λT`` with the float32
    values of the eager ``alpha=λ``: eagerly, the two calls agree bit for bit."""
    x = _problem(2, 3, 8, 8, seed=6)
    n, m = 18, 9
    keep = torch.rand(m, n, generator=torch.Generator().manual_seed(0)) < 0.5
    r = torch.full((n,), 0.3)
    args = ((x["z"][:m], x["z_lhp"][:m]), (x["z"], x["z_lhp"]), x["feats"][:m], x["feats"], x["code_ema"][:m],
            x["code_ema"], (r[:m], r[:m]), (r, r), torch.arange(m), keep)
    common: dict[str, Any] = dict(images=1, tau=0.8, reweight=True, dtype=torch.float32, need_grad=(True, True),
                                  grad_scale=-1.0)
    lam = 0.37
    a_total, a_counts, a_grads = dense.dense_chunk_terms(*args, lam=lam, **common)
    b_total, b_counts, b_grads = dense.dense_chunk_terms(*args, lam=torch.tensor(lam), with_specific=True, **common)
    assert float(a_counts[1]) > 0  # task-specific positives exist: λ mattered
    assert torch.equal(a_total, b_total) and torch.equal(a_counts, b_counts)
    for ga, gb in zip(a_grads, b_grads):
        assert ga is not None and gb is not None
        assert all(torch.equal(u, v) for u, v in zip(ga, gb))
    with pytest.raises(ValueError, match="with_specific"):
        dense.dense_chunk_terms(*args, lam=torch.tensor(lam), **common)


def test_training_through_the_warm_up_end_compiles_twice(
    fresh_dynamo: None, tmp_path: Any, tiny_backbone_file: Any
) -> None:
    """``fit`` with ``loss.compile=true`` over six iterations: λ = 0, 0, then four distinct λ > 0
    (the warm-up ends after iteration 1). Dynamo compiles the chunk twice, not once per λ."""
    cfg = build_config("synthetic", [
        "data.synthetic_train_images=8", "data.synthetic_val_images=4", "data.resolution=32",
        "data.eval_resolution=32", "data.synthetic_classes=3", "model.dim=8", "train.batch_size=4",
        "train.max_iters=6", "train.epochs=3", "train.valid_freq=100", "train.log_freq=1", "train.progress=false",
        "loss.pool_size=8", "loss.warmup=1", "loss.renew_interval=100", "loss.path=dense", "loss.compile=true",
        "eval.batch_size=4", "model.backbone=dino_vits8", f"model.weights={tiny_backbone_file}",
        f"train.out_dir={tmp_path / 'run'}",
    ])
    train_one(cfg, tmp_path / "run")
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    lams = [r["lambda"] for r in rows if "lambda" in r]
    assert len(lams) == 6 and lams[:2] == [0.0, 0.0] and len(set(lams[2:])) == 4 and min(lams[2:]) > 0
    assert {r["train_path"] for r in rows if "train_path" in r} == {"dense"}
    assert _graphs() == 2, dict(counters["stats"])


def test_tensor_lambda_chunk_is_one_graph_without_break() -> None:
    """With λ a tensor the chunk still traces as one graph with no break (a break would split the
    fused kernels on a GPU)."""
    x = _problem(2, 4, 8, 8, seed=7)
    n, m = 32, 16
    explained = torch._dynamo.explain(dense.dense_chunk_terms)(
        (x["z"][:m], x["z_lhp"][:m]), (x["z"], x["z_lhp"]), x["feats"][:m], x["feats"], x["code_ema"][:m],
        x["code_ema"], (torch.zeros(m), torch.zeros(m)), (torch.zeros(n), torch.zeros(n)), torch.arange(m),
        torch.zeros(m, n, dtype=torch.bool), images=1, lam=torch.tensor(0.5), tau=0.8, reweight=True,
        dtype=torch.float32, need_grad=(True, True), grad_scale=-1.0, with_specific=True,
    )
    assert explained.graph_count == 1 and explained.graph_break_count == 0, explained.break_reasons
