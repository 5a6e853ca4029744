"""Multi-process training through torchrun: DistributedDataParallel on CPU (gloo, 2 processes).

The runs go through ``hpseg.cli.main`` exactly as ``torchrun --nproc_per_node=2 -m hpseg train``
does, via this file as the torchrun script: run as ``__main__`` it first wraps a few
``hpseg.train`` functions to record, per rank, the reference pools, the batches (size, image
indices) and the final model parameters into ``$HPSEG_TEST_DDP_DUMP``, then calls the CLI.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from hpseg import distributed as dist

WORLD = 2
GLOBAL_BATCH = 8
TRAIN_IMAGES = 16
EPOCHS = 2
ITERS = EPOCHS * (TRAIN_IMAGES // GLOBAL_BATCH)  # 2 iterations per epoch, 4 in all


def _torchrun(
    tmp_path: Path, weights: Path, *extra: str
) -> tuple[subprocess.CompletedProcess[str], Path, Path]:
    out, dump = tmp_path / "run", tmp_path / "dump"
    dump.mkdir()
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
        "HPSEG_TEST_DDP_DUMP": str(dump),
        "PYTHONWARNINGS": "ignore",
    }
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={WORLD}",
        __file__, "train", "--preset", "synthetic",
        f"data.synthetic_train_images={TRAIN_IMAGES}", "data.synthetic_val_images=4", "data.resolution=32",
        "data.eval_resolution=32", "data.synthetic_classes=3", "data.num_workers=0", "model.dim=8",
        "model.backbone=dino_vits8", f"model.weights={weights}", f"train.batch_size={GLOBAL_BATCH}",
        f"train.epochs={EPOCHS}", "train.valid_freq=2", "train.log_freq=1", "train.progress=false",
        "train.device=cpu", f"train.out_dir={out}", "loss.pool_size=8", "loss.warmup=1",
        "loss.renew_interval=1", "eval.batch_size=4", *extra,
    ]  # fmt: skip
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc, out, dump


def _check_run(proc: subprocess.CompletedProcess[str], out: Path, dump: Path) -> None:
    # --- logs and checkpoints written once, by rank 0 ------------------------------------------
    assert proc.stdout.count("run folder:") == 1
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if "val" not in r]
    assert [r["iteration"] for r in train_rows] == list(range(ITERS))  # each iteration logged once
    assert all(torch.isfinite(torch.tensor(r["loss"])) and r["loss"] > 0 for r in train_rows)
    assert len([r for r in rows if "val" in r]) == ITERS // 2  # valid_freq=2: one validation per epoch
    summary = json.loads((out / "train_summary.json").read_text())
    assert summary["iterations"] == ITERS
    assert summary["world_size"] == WORLD and summary["per_rank_batch"] == GLOBAL_BATCH // WORLD
    assert summary["global_batch"] == GLOBAL_BATCH
    expected = {
        "best.pt",
        "final.pt",
        "last.pt",
        "config.yaml",
        "requested.yaml",
        "metrics.jsonl",
        "train_summary.json",
        "training_curve.png",
        "feature_cache",
    }
    assert {p.name for p in out.iterdir()} <= expected  # no per-rank or temporary leftovers

    # --- every rank: per-rank batch = global / world, disjoint shards ---------------------------
    ranks = [torch.load(dump / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]
    for r in ranks:
        assert r["world"] == WORLD and len(r["batches"]) == ITERS
        assert all(len(indices) == GLOBAL_BATCH // WORLD for indices in r["batches"])
    for step in range(ITERS):
        seen = [set(r["batches"][step]) for r in ranks]
        assert not seen[0] & seen[1], f"step {step}: ranks trained on the same images"
    # --- reference pools identical across ranks (gathered), right sizes --------------------------
    # 2 at start + a renewal at every batch index i % renew_interval == 0, i != 0, within each epoch
    per_epoch = TRAIN_IMAGES // GLOBAL_BATCH
    assert len(ranks[0]["pools"]) == len(ranks[1]["pools"]) == 2 + EPOCHS * (per_epoch - 1)
    for a, b in zip(ranks[0]["pools"], ranks[1]["pools"]):
        assert a.shape[0] == 8 and torch.equal(a, b)
    last = torch.load(out / "last.pt", weights_only=True)
    assert torch.equal(last["pools"]["agnostic"], ranks[0]["pools"][0])
    assert last["rng"]["cpu"].shape[0] == WORLD  # every rank's random stream, for an exact resume
    # --- DDP kept the replicas identical (heads, EMA head, probes) ------------------------------
    for key, value in ranks[0]["params"].items():
        assert torch.equal(value, ranks[1]["params"][key]), key

    from hpseg.checkpoint import load_model

    model = load_model(out / "best.pt")
    assert model.class_names and len(model.class_names) == 3
    final = load_model(out / "final.pt").state_dict()
    for key, value in ranks[0]["params"].items():  # final.pt is the trained model of rank 0
        assert torch.equal(final[key], value), key
    pred = model.predict(torch.randn(1, 3, 32, 32))
    assert pred["linear"].shape == (1, 3, 32, 32)


def test_torchrun_ddp_training(tmp_path, tiny_backbone_file):
    proc, out, dump = _torchrun(tmp_path, tiny_backbone_file)
    _check_run(proc, out, dump)
    assert not (out / "feature_cache").exists()


def test_torchrun_ddp_training_with_feature_cache(tmp_path, tiny_backbone_file):
    proc, out, dump = _torchrun(tmp_path, tiny_backbone_file, "train.cache_features=true")
    _check_run(proc, out, dump)
    assert proc.stderr.count("building the feature cache") == 1  # rank 0 built, rank 1 waited and read
    assert proc.stderr.count("feature cache complete") == 1
    manifest = json.loads((out / "feature_cache" / "manifest.json").read_text())
    assert manifest["complete"] and manifest["length"] == TRAIN_IMAGES
    for r in range(WORLD):
        assert torch.load(dump / f"rank{r}.pt", weights_only=True)["cached_batches"] == ITERS


def test_feature_cache_rank0_builds_others_wait_longer_than_the_group_timeout(tmp_path, tiny_backbone_file):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={WORLD}",
        __file__, "cache-worker", str(tiny_backbone_file), str(tmp_path / "cache"), str(tmp_path), "4",
    ]  # fmt: skip
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-4000:]
    built, waited = (torch.load(tmp_path / f"cache{r}.pt", weights_only=True) for r in range(WORLD))
    assert built["images"] == 6 and waited["images"] == 0  # only rank 0 ran the backbone
    assert torch.equal(built["feats"], waited["feats"])


def test_batch_not_divisible_by_world_is_refused(monkeypatch, tiny_backbone_file, tmp_path):
    from hpseg.config import build_config
    from hpseg.errors import HPSegError
    from hpseg.pipeline import train_one

    monkeypatch.setattr(dist, "world_size", lambda: 3)
    cfg = build_config("synthetic", [
        "data.synthetic_train_images=12", "data.synthetic_val_images=4", "data.resolution=32",
        "data.eval_resolution=32", "model.dim=8", "model.backbone=dino_vits8",
        f"model.weights={tiny_backbone_file}", "train.batch_size=8", "train.progress=false",
        "train.device=cpu",
    ])  # fmt: skip
    with pytest.raises(HPSegError, match="not divisible"):
        train_one(cfg, tmp_path / "run")


def test_local_device_picks_the_local_gpu(monkeypatch):
    from hpseg.runtime import resolve_device

    monkeypatch.setenv("LOCAL_RANK", "1")
    assert dist.local_rank() == 1
    assert resolve_device("cpu", dist.local_rank()) == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert resolve_device("cuda:0", dist.local_rank()) == torch.device("cuda", 0)  # explicit: kept
    assert resolve_device("cuda", dist.local_rank()) == torch.device("cuda", 1)
    assert resolve_device("auto", dist.local_rank()) == torch.device("cuda", 1)


# ------------------------------------------------------------------------------------------
# torchrun worker (this file run as a script)
# ------------------------------------------------------------------------------------------


def _worker_main(argv: list[str]) -> int:
    """Record what each rank does inside ``fit``, then run the real CLI."""
    import hpseg.train as train
    from hpseg.cli import main

    dump = Path(os.environ["HPSEG_TEST_DDP_DUMP"])
    record: dict = {"pools": [], "batches": [], "cached_batches": 0}
    collect, backbone_outputs, fit = train.ReferencePools.collect, train.backbone_outputs, train.fit

    def collect_spy(self, *args, **kwargs):
        pool = collect(self, *args, **kwargs)
        record["pools"].append(pool.detach().cpu().clone())
        return pool

    def backbone_outputs_spy(model, batch, *args, **kwargs):
        record["batches"].append([int(i) for i in batch["index"]])
        record["cached_batches"] += int("feats" in batch)
        return backbone_outputs(model, batch, *args, **kwargs)

    def fit_spy(model, *args, **kwargs):
        summary = fit(model, *args, **kwargs)
        params = {
            k: v.detach().cpu().clone()
            for k, v in model.state_dict().items()
            if not k.startswith("backbone.")
        }
        record.update(params=params, world=dist.world_size())
        torch.save(record, dump / f"rank{dist.rank()}.pt")
        return summary

    train.ReferencePools.collect = collect_spy  # type: ignore[method-assign]
    train.backbone_outputs, train.fit = backbone_outputs_spy, fit_spy
    import hpseg.pipeline as pipeline

    pipeline.fit = fit_spy  # imported by name there
    return main(argv)


def _cache_worker(argv: list[str]) -> int:
    """Rank 0 builds a feature cache slowly (longer than the process group's timeout) while
    rank 1 waits; both then read it. Records backbone images seen and the features read."""
    import datetime
    import time

    from hpseg.backbones import build_backbone
    from hpseg.data import build_dataset
    from hpseg.feature_cache import CachedFeatures

    weights, cache_dir, dump, build_seconds = argv[0], Path(argv[1]), Path(argv[2]), float(argv[3])
    torch.distributed.init_process_group("gloo", timeout=datetime.timedelta(seconds=2))
    backbone = build_backbone("dino_vits8", weights)
    seen = {"images": 0}
    forward = backbone.forward

    def slow_forward(images, with_attention=True):
        seen["images"] += images.shape[0]
        time.sleep(build_seconds)
        return forward(images, with_attention)

    backbone.forward = slow_forward  # type: ignore[method-assign]
    ds = build_dataset("synthetic", None, "train", mode="train", resolution=32, n_images=6, n_classes=3)
    cached = CachedFeatures.wrap(ds, backbone, cache_dir, "cpu", batch_size=8)
    feats = torch.stack([cached[i]["feats"] for i in range(len(cached))])
    torch.save({"images": seen["images"], "feats": feats}, dump / f"cache{dist.rank()}.pt")
    torch.distributed.barrier()
    dist.shutdown()
    return 0


if __name__ == "__main__":
    if sys.argv[1] == "cache-worker":
        sys.exit(_cache_worker(sys.argv[2:]))
    sys.exit(_worker_main(sys.argv[1:]))
