"""A failing process stops a multi-process run cleanly, and a killed run resumes exactly
(gloo, 2 processes on CPU).

The runs go through ``hpseg.cli.main`` with this file as the script of every process. Run as
``__main__`` it plants the fault named by ``$HPSEG_TEST_FAULT`` (``KIND:RANK:ITERATION``) into
``hpseg.train.train_step`` of that rank, then calls the CLI:

- ``nan``: the loss that rank *reports* at that iteration is NaN (its gradients stay finite, so
  only the finiteness check's collective can tell the other rank);
- ``kill``: that rank SIGKILLs itself after the step (first attempt of a torchrun job only);
- ``hang``: that rank stops answering before the step (it still dies on SIGTERM);
- ``term``: that rank alone receives SIGTERM after the step.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from hpseg import distributed as dist
from hpseg.errors import HPSegError

WORLD = 2
GLOBAL_BATCH = 8
TRAIN_IMAGES = 24  # 3 iterations per epoch
EPOCHS = 2  # 6 iterations
ITERS = EPOCHS * TRAIN_IMAGES // GLOBAL_BATCH


def _settings(out: Path, weights: Path, *extra: str) -> list[str]:
    return [
        "train", "--preset", "synthetic",
        f"data.synthetic_train_images={TRAIN_IMAGES}", "data.synthetic_val_images=4", "data.resolution=32",
        "data.eval_resolution=32", "data.synthetic_classes=3", "data.num_workers=0", "model.dim=8",
        "model.backbone=dino_vits8", f"model.weights={weights}", f"train.batch_size={GLOBAL_BATCH}",
        f"train.epochs={EPOCHS}", "train.valid_freq=2", "train.log_freq=1", "train.progress=false",
        "train.device=cpu", f"train.out_dir={out}", "loss.pool_size=8", "loss.warmup=1",
        "loss.renew_interval=1", "loss.rho=0.5", "eval.batch_size=4", *extra,
    ]  # fmt: skip


def _env(fault: str | None = None) -> dict[str, str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    env.pop("HPSEG_TEST_FAULT", None)
    if fault:
        env["HPSEG_TEST_FAULT"] = fault
    return env


def _torchrun(args: list[str], fault: str | None = None, *launcher: str) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={WORLD}", *launcher,
           __file__, *args]
    return subprocess.run(cmd, env=_env(fault), capture_output=True, text=True, timeout=300, check=False)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _launch(args: list[str], fault: str, tmp_path: Path) -> list[subprocess.Popen[str]]:
    """Both ranks as plain processes (torchrun's environment by hand): each one's exit status
    and stderr of its own."""
    port, procs = _free_port(), []
    for rank in range(WORLD):
        env = {**_env(fault), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": str(rank),
               "LOCAL_RANK": str(rank), "WORLD_SIZE": str(WORLD), "LOCAL_WORLD_SIZE": str(WORLD)}
        err = (tmp_path / f"stderr{rank}.txt").open("w")
        procs.append(subprocess.Popen([sys.executable, __file__, *args], env=env, stdout=subprocess.DEVNULL,
                                      stderr=err, text=True))
        err.close()
    return procs


def _wait(procs: list[subprocess.Popen[str]], timeout: float = 300) -> list[int]:
    """Every process's exit status; none is left running, whatever happens."""
    try:
        return [p.wait(timeout=timeout) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()


def _errors(tmp_path: Path, rank: int) -> list[str]:
    return [line for line in (tmp_path / f"stderr{rank}.txt").read_text().splitlines() if line.startswith("error:")]


def _train_rows(run: Path) -> list[dict]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k != "seconds"} for r in rows if "val" not in r]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, tiny_backbone_file) -> Path:
    run = tmp_path_factory.mktemp("straight") / "run"
    proc = _torchrun(_settings(run, tiny_backbone_file))
    assert proc.returncode == 0, proc.stderr[-4000:]
    return run


def test_rank_killed_under_max_restarts_resumes_exactly(tmp_path, tiny_backbone_file, uninterrupted):
    """SIGKILL of rank 1 after iteration 2 (last.pt holds iteration 2, mid-epoch): torchrun
    restarts both processes, they resume from last.pt (rank 1's random streams from a row of
    last.pt) and end with the weights and the losses of the run never interrupted, bit for bit."""
    run = tmp_path / "run"
    proc = _torchrun(_settings(run, tiny_backbone_file), "kill:1:2", "--max-restarts=1")
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "resumed from" in proc.stderr and "at iteration 2" in proc.stderr  # it was killed, then resumed
    assert "Segmentation fault" not in proc.stderr
    _assert_same_run(run, uninterrupted)


def _assert_same_run(run: Path, reference: Path) -> None:
    a = torch.load(run / "final.pt", weights_only=True)["state_dict"]
    b = torch.load(reference / "final.pt", weights_only=True)["state_dict"]
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key  # bit for bit
    assert _train_rows(run) == _train_rows(reference)  # same losses at every step, none twice


def test_a_signal_to_one_rank_stops_every_rank_at_the_same_iteration(tmp_path, tiny_backbone_file, uninterrupted):
    """SIGTERM to rank 1 only, after iteration 2: the save is a collective, so both ranks agree on
    the stop at the same step boundary (one all-reduce of the signals at log/validation points),
    both write their part of last.pt and exit 143 with the same line; the same command again ends
    bit for bit as the run never interrupted."""
    run = tmp_path / "run"
    codes = _wait(_launch(_settings(run, tiny_backbone_file), "term:1:2", tmp_path))
    assert codes == [128 + signal.SIGTERM] * WORLD, (tmp_path / "stderr0.txt").read_text()[-3000:]
    stopped = torch.load(run / "last.pt", weights_only=True)["state"]["iteration"]
    assert stopped == 3  # after iteration 2 (0-based), on both ranks
    for rank in range(WORLD):
        text = (tmp_path / f"stderr{rank}.txt").read_text()
        assert f"interrupted: SIGTERM: stopped at iteration {stopped}" in text, text[-2000:]
    proc = _torchrun(_settings(run, tiny_backbone_file))
    assert proc.returncode == 0, proc.stderr[-4000:]
    _assert_same_run(run, uninterrupted)


def test_killed_run_resumes_exactly_with_the_same_command(tmp_path, tiny_backbone_file, uninterrupted):
    """Without a launcher that restarts: rank 1 dies after iteration 2, rank 0 stops at its next
    collective with one line saying so; the same command again resumes and ends bit for bit as
    the run never interrupted."""
    run = tmp_path / "run"
    procs = _launch(_settings(run, tiny_backbone_file), "kill:1:2", tmp_path)
    codes = _wait(procs)
    assert codes == [2, -signal.SIGKILL], (tmp_path / "stderr0.txt").read_text()[-3000:]
    errors = _errors(tmp_path, 0)
    assert len(errors) == 1 and errors[0].startswith(
        "error: rank 0: the all-gather of the finiteness check failed: another process left the run ("), errors
    assert torch.load(run / "last.pt", weights_only=True)["state"]["iteration"] == 2
    procs = _launch(_settings(run, tiny_backbone_file), "", tmp_path)
    assert _wait(procs) == [0, 0], (tmp_path / "stderr1.txt").read_text()[-3000:]
    assert "resumed from" in (tmp_path / "stderr1.txt").read_text()
    _assert_same_run(run, uninterrupted)


def test_non_finite_loss_on_one_rank_stops_every_rank_at_the_same_check(tmp_path, tiny_backbone_file):
    """Rank 1 alone reports a NaN loss at iteration 3; the next check (the save point after
    iteration 4) sees it on both ranks: both exit 2 with the same one-line error naming rank 1
    and iteration 3, and nothing is written after iteration 3."""
    run = tmp_path / "run"
    procs = _launch(_settings(run, tiny_backbone_file, "train.log_freq=100"), "nan:1:3", tmp_path)
    codes = _wait(procs)
    assert codes == [2, 2], [(tmp_path / f"stderr{r}.txt").read_text()[-3000:] for r in range(WORLD)]
    errors = [_errors(tmp_path, r) for r in range(WORLD)]
    assert len(errors[0]) == 1 and errors[0] == errors[1], errors
    assert errors[0][0].startswith("error: non-finite loss at iteration 3 on rank 1 (loss nan, loss_hp "), errors
    assert torch.load(run / "last.pt", weights_only=True)["state"]["iteration"] == 3  # the save before it
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert max(r["iteration"] for r in rows) <= 3
    assert not (run / "final.pt").exists() and not (run / "train_summary.json").exists()


def test_hung_rank_fails_the_others_within_the_timeout_naming_the_collective(tmp_path, tiny_backbone_file):
    """Rank 1 stops answering before iteration 3; rank 0 waits in that step's gradient
    all-reduce for train.dist_timeout seconds, then exits 2 with one line naming it."""
    timeout = 6
    procs = _launch(_settings(tmp_path / "run", tiny_backbone_file, f"train.dist_timeout={timeout}"),
                    f"hang:1:3:{tmp_path / 'hung'}", tmp_path)
    try:
        code = procs[0].wait(timeout=300)
        ended = time.time()
        assert procs[1].poll() is None  # still hung
    finally:
        for p in procs:  # rank 1 (and rank 0 if it never stopped)
            p.kill()
            p.wait()
    assert code == 2, (tmp_path / "stderr0.txt").read_text()[-3000:]
    hung = float((tmp_path / "hung").read_text())
    assert timeout - 1 < ended - hung < timeout + 30  # bounded by the timeout, not by the default
    errors = _errors(tmp_path, 0)
    assert errors == [f"error: rank 0: the training step of iteration 3 (candidate gathers, DDP gradient all-reduce) timed out after {timeout} s: "
                      "another process stopped answering (hung, or slower than train.dist_timeout allows); see its "
                      "log, raise train.dist_timeout if it was only slow, and run the same command again to resume "
                      "from last.pt"], errors


# ------------------------------------------------------------------------------------------
# in one process
# ------------------------------------------------------------------------------------------


def test_collective_names_a_lost_process_and_passes_other_errors(monkeypatch):
    monkeypatch.setattr(dist, "is_distributed", lambda: True)
    monkeypatch.setattr(dist, "rank", lambda: 1)
    monkeypatch.setitem(dist._group, "timeout", 60.0)
    with pytest.raises(HPSegError, match=r"^rank 1: the all-gather of X failed: another process left the run "
                                         r"\(Read error \[127.0.0.1\]:1: Connection reset by peer\); see its log"):
        with dist.collective("the all-gather of X"):
            raise RuntimeError("[gloo/transport/tcp/pair.cc:545] Read error [127.0.0.1]:1: Connection reset by peer. "
                               "This is typically caused by a remote worker hanging")
    with pytest.raises(HPSegError, match=r"^rank 1: the barrier timed out after 60 s: another process stopped"):
        with dist.collective("the barrier"):
            raise RuntimeError("[gloo/unbound_buffer.cc:78] Timed out waiting 60000ms for recv operation to complete")
    with pytest.raises(HPSegError, match=r"^rank 1: the wait for rank 0 timed out after 3600 s: "):  # its own wait
        with dist.collective("the wait for rank 0", 3600.0):
            raise torch.distributed.DistStoreError("wait timeout after 3600000ms, keys: /hpseg/rank0-done/1")
    with pytest.raises(RuntimeError, match="shape mismatch"):  # not a collective's failure: unchanged
        with dist.collective("the barrier"):
            raise RuntimeError("shape mismatch")


def test_rank_1_resumes_its_own_random_streams_from_last_pt(tmp_path):
    """Rank 1's rows of last.pt (views at a non-zero offset) restore its CPU stream and pool
    generator — run in a process of its own: restoring from the view crashed the process."""
    code = f"""
import torch
from pathlib import Path
from hpseg.checkpointing import LAST_FORMAT_VERSION, Checkpointer, TrainState
from hpseg.runtime import Runtime
from hpseg.train import ReferencePools

class Stub:
    def load_state_dict(self, state):
        pass

gens = [torch.Generator().manual_seed(s) for s in (1, 2)]
cpu = [torch.manual_seed(s).get_state() for s in (3, 4)]
torch.save({{"format_version": LAST_FORMAT_VERSION, "model": {{}}, "optimizers": {{}}, "scaler": {{}},
            "pools": {{"agnostic": torch.zeros(2, 3), "specific": torch.zeros(2, 4),
                      "generator": torch.stack([g.get_state() for g in gens])}},
            "state": {{"iteration": 5}}, "rng": {{"cpu": torch.stack(cpu)}}, "config": {{}}}},
           Path({str(tmp_path)!r}) / "last.pt")
runtime = Runtime.create("cpu", "fp32", rank=1, world_size=2)
pools, state = ReferencePools(2, 0.1, torch.Generator()), TrainState()
ckpt = Checkpointer(Path({str(tmp_path)!r}), runtime, {{}})
assert ckpt.resume(Stub(), Stub(), Stub(), pools, state) and state.iteration == 5
assert torch.equal(pools.generator.get_state(), gens[1].get_state())
assert torch.equal(torch.get_rng_state(), cpu[1])
print("ok")
"""
    proc = subprocess.run([sys.executable, "-c", code], env=_env(), capture_output=True, text=True, timeout=120,
                          check=False)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", (proc.returncode, proc.stderr[-3000:])


def test_dist_timeout_is_checked_and_does_not_make_a_run_another(tmp_path):
    from hpseg.checkpointing import changed_settings
    from hpseg.config import build_config

    with pytest.raises(HPSegError, match="train.dist_timeout must be a positive"):
        build_config("synthetic", ["train.dist_timeout=0"])
    before, now = build_config("synthetic", []).to_dict(), build_config("synthetic", ["train.dist_timeout=20"]).to_dict()
    assert now["train"]["dist_timeout"] == 20.0
    assert changed_settings(before, now, finished=True) == []  # a finished run is not refused for it


# ------------------------------------------------------------------------------------------
# the script of every process
# ------------------------------------------------------------------------------------------


def _plant(kind: str, rank: int, iteration: int, extra: list[str]) -> None:
    import hpseg.train as train

    real = train.train_step

    def step(*args, **kwargs):
        it = kwargs["step"]
        if kind == "hang" and it == iteration and dist.rank() == rank:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            Path(extra[0]).write_text(str(time.time()))
            while True:
                time.sleep(1)
        out = real(*args, **kwargs)
        if it == iteration and dist.rank() == rank:
            if kind == "nan":
                out.loss = out.loss * float("nan")  # what it reports; its gradients stay finite
            elif kind == "kill" and os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0":
                os.kill(os.getpid(), signal.SIGKILL)
            elif kind == "term":
                os.kill(os.getpid(), signal.SIGTERM)
        return out

    train.train_step = step


if __name__ == "__main__":
    fault = os.environ.get("HPSEG_TEST_FAULT")
    if fault:
        kind, rank, iteration, *extra = fault.split(":", 3)
        _plant(kind, int(rank), int(iteration), extra)
    from hpseg.cli import main

    sys.exit(main(sys.argv[1:]))
