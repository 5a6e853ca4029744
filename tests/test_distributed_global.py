"""The global-batch loss across processes (``loss.candidates=global``), on CPU with gloo.

* the gathered-candidate loss of 2 processes on random tensors equals the loss of one process
  holding the whole batch, value, gradients and statistics, on the dense, sparse and fused paths;
* 2-process training (torchrun, through the CLI) ends with the weights of 1-process training
  with the same global batch, dropout on and off — DINO, DINOv2 with registers and DINOv3 (random,
  tiny) backbones;
* a run resumes exactly on another number of processes (2 → 1, 1 → 2); with
  ``loss.candidates=local`` such a resume is refused, naming both numbers.

The training runs go through ``hpseg.cli.main`` via this file run as a script (by ``torchrun`` or
plain Python): ``HPSEG_TEST_STOP_AFTER=k`` stops the run after ``k`` iterations as a SIGTERM would
(``last.pt`` written, then exit), ``HPSEG_TEST_TINY_TIMM=1`` builds timm backbones narrow and shallow.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from hpseg.heads import probe_cross_entropy

WORLD = 2
#: loss paths compared across processes: the fused one too where Triton runs (its interpreter on CPU:
#: tests/conftest.py sets TRITON_INTERPRET=1, which the spawned processes inherit)
INTERPRETED = importlib.util.find_spec("triton") is not None and os.environ.get("TRITON_INTERPRET") == "1"
LOSS_PATHS = ("dense", "sparse") + (("fused",) if INTERPRETED else ())
TRAIN_IMAGES, GLOBAL_BATCH, EPOCHS = 16, 8, 2  # 2 iterations per epoch, 4 in all


# ------------------------------------------------------------------------------------------
# the loss on random tensors: 2 gloo processes vs one
# ------------------------------------------------------------------------------------------

IMAGES, PER_IMAGE, D, F_DIM, P = 4, 9, 8, 6, 6


def _inputs() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    n = IMAGES * PER_IMAGE

    def unit(*shape: int) -> torch.Tensor:
        return torch.nn.functional.normalize(torch.randn(*shape, generator=g), dim=-1)

    return {"z": unit(n, D), "z_lhp": unit(n, D), "f": unit(n, F_DIM), "s": unit(n, D),
            "pool_ag": unit(P, F_DIM), "pool_sp": unit(P, D)}


def _loss(x: dict[str, torch.Tensor], rows: slice, path: str, candidates: str):
    from hpseg.hidden_positives import HiddenPositiveLoss

    z, z_lhp = x["z"][rows].clone().requires_grad_(), x["z_lhp"][rows].clone().requires_grad_()
    module = HiddenPositiveLoss(0.5, 0.3, path=path, seed=11, candidates=candidates, chunk_images=1)
    images = (rows.stop - rows.start) // PER_IMAGE
    loss = module(z, z_lhp, x["f"][rows], x["s"][rows], x["pool_ag"], x["pool_sp"], num_images=images, lam=0.5,
                  step=5)
    loss.backward()
    return loss.detach(), z.grad, z_lhp.grad, module.stats


def _probe_inputs() -> tuple[torch.Tensor, torch.Tensor]:
    """Probe logits ``(B, 3, 2, 2)`` and labels ``(B, 4, 4)``, most of image 0's pixels ignored."""
    g = torch.Generator().manual_seed(4)
    label = torch.randint(0, 3, (IMAGES, 4, 4), generator=g)
    label[0, :3] = -1
    return torch.randn(IMAGES, 3, 2, 2, generator=g), label


def _loss_worker(rank: int, init: str, out: str) -> None:
    torch.distributed.init_process_group("gloo", init_method=init, rank=rank, world_size=WORLD)
    x, share = _inputs(), IMAGES // WORLD * PER_IMAGE
    rows = slice(rank * share, (rank + 1) * share)
    results = {path: _loss(x, rows, path, "global") for path in LOSS_PATHS}
    local = _loss(x, rows, "dense", "local")[0]
    logits, label = _probe_inputs()
    mine = slice(rank * (IMAGES // WORLD), (rank + 1) * (IMAGES // WORLD))
    probe = [probe_cross_entropy(logits[mine], label[mine], across_ranks=a) for a in (True, False)]
    torch.save({"results": results, "local": local, "probe": probe}, f"{out}/rank{rank}.pt")
    torch.distributed.destroy_process_group()


def test_gathered_candidates_give_the_one_process_loss_and_gradient(tmp_path: Path) -> None:
    torch.multiprocessing.spawn(_loss_worker, args=(f"file://{tmp_path}/init", str(tmp_path)), nprocs=WORLD)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]
    x, share = _inputs(), IMAGES // WORLD * PER_IMAGE
    for path in LOSS_PATHS:
        loss, grad_z, grad_lhp, stats = _loss(x, slice(0, IMAGES * PER_IMAGE), path, "local")
        assert stats["kept_anchor_fraction"] > 0.5 and 0 < stats["denominator_fraction"] < 1  # a real test
        parts = [r["results"][path] for r in ranks]
        # each rank returns world × its share: their mean is the global loss
        assert torch.allclose(sum(p[0] for p in parts) / WORLD, loss, rtol=1e-6, atol=1e-7), path
        for r, p in enumerate(parts):  # the gradient reaching a rank's rows is world × the global one
            rows = slice(r * share, (r + 1) * share)
            assert torch.allclose(p[1] / WORLD, grad_z[rows], atol=1e-7), path
            assert torch.allclose(p[2] / WORLD, grad_lhp[rows], atol=1e-7), path
            for key in ("positives_per_anchor", "specific_per_anchor", "kept_anchor_fraction",
                        "denominator_fraction"):
                assert p[3][key] == pytest.approx(stats[key], rel=1e-12), (path, key)
    # "local": each rank's own images only — another loss
    assert not torch.allclose(sum(r["local"] for r in ranks) / WORLD, loss)
    # the linear probe's cross-entropy: the ranks' mean is the global batch's mean over valid pixels
    whole = probe_cross_entropy(*_probe_inputs())
    assert torch.allclose(sum(r["probe"][0] for r in ranks) / WORLD, whole, rtol=1e-6)
    assert not torch.allclose(sum(r["probe"][1] for r in ranks) / WORLD, whole, rtol=1e-3)  # per-rank means


# ------------------------------------------------------------------------------------------
# per-image randomness: a rank's share draws what one process draws for those images
# ------------------------------------------------------------------------------------------


def _as_rank(monkeypatch: pytest.MonkeyPatch, rank: int, world: int) -> None:
    from hpseg import distributed as dist

    monkeypatch.setattr(dist, "rank", lambda: rank)
    monkeypatch.setattr(dist, "world_size", lambda: world)


@pytest.mark.parametrize("world", [2, 4])
def test_dropout_masks_belong_to_images_not_ranks(monkeypatch: pytest.MonkeyPatch, world: int) -> None:
    from hpseg.heads import share_dropout2d

    x = torch.randn(8, 16, 3, 3)
    torch.manual_seed(5)
    one = torch.nn.functional.dropout2d(x, 0.3, True)
    b = 8 // world
    for rank in range(world):
        _as_rank(monkeypatch, rank, world)
        from hpseg import distributed as dist

        torch.manual_seed(5)  # every rank holds the same stream
        with dist.batch_share(b):
            share = share_dropout2d(x[rank * b : (rank + 1) * b], 0.3, True)
        assert torch.equal(share, one[rank * b : (rank + 1) * b]), rank
    assert not torch.equal(one[:b], one[b : 2 * b])  # the images' masks differ: a real test


def test_pool_positions_belong_to_images_not_ranks() -> None:
    from hpseg.hidden_positives import sample_pool_entries

    x = torch.randn(8, 4, 5, 5)
    one = sample_pool_entries(x, torch.Generator().manual_seed(2))
    shares = [sample_pool_entries(x[r * 4 : (r + 1) * 4], torch.Generator().manual_seed(2), share=(r * 4, 8))
              for r in range(2)]
    assert torch.equal(torch.cat(shares), one)


def test_global_batches_hold_the_same_images_for_any_world_size() -> None:
    from hpseg.data.sampler import EpochSampler

    def batches(world: int, start: int = 0) -> list[list[int]]:
        ranks = []
        for r in range(world):
            sampler = EpochSampler(21, 8 // world, seed=3, rank=r, world=world)
            sampler.set_epoch(1, start)
            ranks.append(list(sampler))
        per = 8 // world
        out = []
        for k in range(len(ranks[0]) // per):
            out.append([item for rank in ranks for item in rank[k * per : (k + 1) * per]])
        return out

    one = batches(1)
    assert len(one) == 2 and batches(2) == one and batches(4) == one  # items and augmentation seeds
    assert batches(2, start=1) == one[1:]


def test_candidates_setting_is_checked() -> None:
    from hpseg.config import build_config
    from hpseg.errors import HPSegError

    assert build_config("synthetic").loss.candidates == "global"
    assert build_config("synthetic", ["loss.candidates=local"]).loss.candidates == "local"
    with pytest.raises(HPSegError, match="^loss.candidates must be global or local, got 'all'$"):
        build_config("synthetic", ["loss.candidates=all"])


def test_a_run_folder_from_before_the_setting_is_not_another_run() -> None:
    from hpseg.checkpointing import changed_settings
    from hpseg.config import build_config

    now = build_config("synthetic").to_dict()
    before = build_config("synthetic").to_dict()
    del before["loss"]["candidates"]  # written by an hpseg without loss.candidates
    assert changed_settings(before, now, finished=False) == []
    assert changed_settings(before, now, finished=True) == []
    local = build_config("synthetic", ["loss.candidates=local"]).to_dict()
    assert changed_settings(local, now, finished=False) == [("loss.candidates", "local", "global")]


# ------------------------------------------------------------------------------------------
# training: torchrun with 2 processes vs one process
# ------------------------------------------------------------------------------------------

#: per case: the settings of the runs compared (the sparse path with dropout, the dense one without)
DROPOUT_ON = ["model.dropout=0.1", "loss.rho=0.05", "loss.path=sparse"]
DROPOUT_OFF = ["model.dropout=0.0", "loss.rho=0.5", "loss.path=dense"]
TINY_TIMM = {"embed_dim": 48, "depth": 2, "num_heads": 2}


def _train(out: Path, world: int, weights: Path | None, *extra: str, stop_after: int | None = None,
           ok: bool = True) -> subprocess.CompletedProcess[str]:
    """``hpseg train`` of the synthetic preset, tiny, into ``out`` with ``world`` processes."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    env.pop("HPSEG_TEST_STOP_AFTER", None)
    if stop_after is not None:
        env["HPSEG_TEST_STOP_AFTER"] = str(stop_after)
    launch = [sys.executable] if world == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={world}"]
    backbone = ["model.backbone=dino_vits8", f"model.weights={weights}"] if weights else []
    cmd = [
        *launch, __file__, "train", "--preset", "synthetic",
        f"data.synthetic_train_images={TRAIN_IMAGES}", "data.synthetic_val_images=2", "data.resolution=32",
        "data.eval_resolution=32", "data.synthetic_classes=3", "data.num_workers=0", "model.dim=8",
        *backbone, f"train.batch_size={GLOBAL_BATCH}", f"train.epochs={EPOCHS}", "train.log_freq=1",
        "train.progress=false", "train.device=cpu", f"train.out_dir={out}", "loss.pool_size=8",
        "loss.warmup=1", "loss.renew_interval=1", "loss.chunk_images=1", "eval.batch_size=2", *extra,
    ]  # fmt: skip
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, check=False)
    if ok:
        assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


def _weights(out: Path) -> dict[str, torch.Tensor]:
    """The trained modules of the run's final model (heads, EMA head, projection, probes)."""
    state = torch.load(out / "last.pt", weights_only=True)["model"]
    return {k: v for k, v in state.items() if not k.startswith("backbone.")}


def _assert_same_weights(a: Path, b: Path, atol: float = 1e-6) -> None:
    wa, wb = _weights(a), _weights(b)
    assert wa.keys() == wb.keys()
    worst = max((wa[k] - wb[k]).abs().max().item() for k in wa)
    assert worst <= atol, f"weights differ by {worst:.3g}"


def _logged_losses(out: Path) -> list[float]:
    import json

    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return [r["loss_hp"] for r in rows if "val" not in r]


@pytest.fixture(scope="module")
def one_process(tmp_path_factory: pytest.TempPathFactory, tiny_backbone_file: Path) -> Path:
    """The reference: one process, dropout on, the whole global batch."""
    out = tmp_path_factory.mktemp("one") / "run"
    _train(out, 1, tiny_backbone_file, *DROPOUT_ON)
    return out


@pytest.mark.parametrize("case", ["dropout", "no-dropout"])
def test_two_processes_train_the_one_process_model(
    case: str, one_process: Path, tiny_backbone_file: Path, tmp_path: Path
) -> None:
    settings = DROPOUT_ON if case == "dropout" else DROPOUT_OFF
    single = one_process
    if case != "dropout":
        single = tmp_path / "one"
        _train(single, 1, tiny_backbone_file, *settings)
    _train(tmp_path / "two", WORLD, tiny_backbone_file, *settings)
    _assert_same_weights(single, tmp_path / "two")
    # the logged loss is the global batch's (the ranks' shares combined), not rank 0's share
    assert _logged_losses(tmp_path / "two") == pytest.approx(_logged_losses(single), rel=1e-5)


@pytest.mark.parametrize(("first", "then"), [(2, 1), (1, 2)])
def test_resume_on_another_number_of_processes_is_exact(
    first: int, then: int, one_process: Path, tiny_backbone_file: Path, tmp_path: Path
) -> None:
    out = tmp_path / "run"
    stopped = _train(out, first, tiny_backbone_file, *DROPOUT_ON, stop_after=2, ok=False)
    assert stopped.returncode != 0 and torch.load(out / "last.pt", weights_only=True)["state"]["iteration"] == 2
    resumed = _train(out, then, tiny_backbone_file, *DROPOUT_ON)
    assert "resumed from" in resumed.stderr and f"resuming a run of {first} process(es) with {then}" in resumed.stderr
    _assert_same_weights(one_process, out)


def test_local_candidates_train_another_model_and_refuse_another_world_size(
    one_process: Path, tiny_backbone_file: Path, tmp_path: Path
) -> None:
    out = tmp_path / "run"
    _train(out, WORLD, tiny_backbone_file, *DROPOUT_ON, "loss.candidates=local", stop_after=2, ok=False)
    last = torch.load(out / "last.pt", weights_only=True)
    assert last["state"]["iteration"] == 2
    refused = _train(out, 1, tiny_backbone_file, *DROPOUT_ON, "loss.candidates=local", ok=False)
    assert refused.returncode == 2
    message = [line for line in refused.stderr.splitlines() if line.startswith("error:")]
    assert message and "written by 2 process(es) and this run has 1" in message[0]
    assert "loss.candidates=local" in message[0] and "--nproc_per_node=2" in message[0]
    assert torch.load(out / "last.pt", weights_only=True)["state"]["iteration"] == 2  # left as it was
    _train(out, WORLD, tiny_backbone_file, *DROPOUT_ON, "loss.candidates=local")  # its own world size: fine
    with pytest.raises(AssertionError, match="weights differ"):  # each anchor saw half the candidates
        _assert_same_weights(one_process, out)


@pytest.mark.parametrize(("backbone", "resolution"), [("vit_small_patch14_reg4_dinov2", 42), ("dinov3_vits16", 48)])
def test_timm_backbones_under_ddp(backbone: str, resolution: int, tmp_path: Path) -> None:
    settings = [f"model.backbone={backbone}", "model.pretrained=false", f"data.resolution={resolution}",
                f"data.eval_resolution={resolution}", *DROPOUT_OFF]
    _train(tmp_path / "one", 1, None, *settings)
    _train(tmp_path / "two", WORLD, None, *settings)
    # the random backbone is the same on every rank (seeded alike) and its features do not depend
    # on the per-process batch; the gradient of a row is summed in another order across 2
    # processes, and with 3×3 patches and an 8-entry pool a pair within rounding of its threshold
    # can flip in a later step (DINOv3, step 4: weights 4e-6 apart) — hence 1e-4 here, 1e-6 above
    _assert_same_weights(tmp_path / "one", tmp_path / "two", atol=1e-4)


# ------------------------------------------------------------------------------------------
# the training worker (this file run as a script)
# ------------------------------------------------------------------------------------------


def _worker_main(argv: list[str]) -> int:
    """Apply the test switches (module docstring), then run the real CLI."""
    import contextlib

    import hpseg.pipeline as pipeline
    import hpseg.train as train
    from hpseg.backbones import build_backbone
    from hpseg.checkpointing import StopRequest
    from hpseg.cli import main

    stop_after = os.environ.get("HPSEG_TEST_STOP_AFTER")
    if stop_after is not None:

        class StopAfter(StopRequest):
            reads = 0

            @property  # type: ignore[override]
            def requested(self) -> bool:  # read once per iteration, after it
                self.reads += 1
                return self.reads >= int(stop_after)

            @requested.setter
            def requested(self, value: bool) -> None:
                pass

        @contextlib.contextmanager
        def stop_soon(*args: object, **kwargs: object):
            yield StopAfter()

        train.stop_on_signals = stop_soon  # type: ignore[assignment]
    if "model.pretrained=false" in argv:
        pipeline.build_backbone = lambda name, *a, **k: build_backbone(name, *a, **k, timm_kwargs=TINY_TIMM)
    return main(argv)


if __name__ == "__main__":
    sys.exit(_worker_main(sys.argv[1:]))
