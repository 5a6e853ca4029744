"""Run folders survive pre-emption and accidents (issue #25): a signal to the whole process group
with DataLoader workers, two runs into one folder, a crash before the first save, a torn log
line, a damaged ``last.pt``, a full disk, a read-only folder, Ctrl-C pressed twice.

Every run is the ``synthetic`` preset at a toy size (4 steps, 2 per epoch, ``last.pt`` at the end
of each epoch); faults are planted at a step by patching ``hpseg.train.train_step``.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import hpseg.train as train_module
from hpseg.cli import main
from hpseg.errors import HPSegError
from hpseg.preemption import LOCK_NAME, RunFolderBusy, Stopped, run_folder_lock

ROOT = Path(__file__).resolve().parents[1]
SETTINGS = [
    "data.synthetic_train_images=8",
    "data.synthetic_val_images=2",
    "data.resolution=32",
    "data.eval_resolution=32",
    "data.synthetic_classes=3",
    "data.num_workers=0",
    "model.dim=8",
    "model.backbone=dino_vits8",
    "train.batch_size=4",
    "train.epochs=2",  # 2 steps per epoch, 4 in all; last.pt after iterations 2 and 4
    "train.valid_freq=100",
    "train.log_freq=1",
    "train.progress=false",
    "loss.pool_size=4",
    "loss.warmup=1",
    "loss.renew_interval=2",
    "loss.rho=0.25",
    "eval.batch_size=2",
]


class _Crash(Exception):
    """Stands for SIGKILL: the process dies between two steps without saving anything."""


def _argv(run: Path, weights: Path, *extra: str) -> list[str]:
    return ["train", "--preset", "synthetic", *SETTINGS, f"model.weights={weights}", f"train.out_dir={run}", *extra]


def _at_step(monkeypatch, actions: dict[int, object]) -> None:
    """Make ``train_step`` call ``actions[n]()`` after its ``n``-th call (in this process)."""
    real, calls = train_module.train_step, {"n": 0}

    def step(*args, **kwargs):
        out = real(*args, **kwargs)
        calls["n"] += 1
        if calls["n"] in actions:
            actions[calls["n"]]()
        return out

    monkeypatch.setattr(train_module, "train_step", step)


def _crash() -> None:
    raise _Crash


def _rows(run: Path) -> list[dict]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k != "seconds"} for r in rows]


def _iteration(run: Path) -> int:
    return torch.load(run / "last.pt", weights_only=True)["state"]["iteration"]


def _assert_same_run(run: Path, reference: Path) -> None:
    a = torch.load(run / "final.pt", weights_only=True)["state_dict"]
    b = torch.load(reference / "final.pt", weights_only=True)["state_dict"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # exactly, on CPU
    assert [r for r in _rows(run) if "val" not in r] == [r for r in _rows(reference) if "val" not in r]
    assert not list(run.glob(".*.tmp")) and not (run / LOCK_NAME).exists()


def _error_lines(err: str) -> list[str]:
    """stderr without its log lines (they start with a time)."""
    return [line for line in err.splitlines() if line.strip() and not line[:2].isdigit()]


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_backbone_file) -> Path:
    """The uninterrupted run."""
    run = tmp_path_factory.mktemp("reference") / "run"
    assert main(_argv(run, tiny_backbone_file)) == 0
    return run


@pytest.fixture(scope="module")
def interrupted(tmp_path_factory, tiny_backbone_file) -> Path:
    """A run that died in its 4th step (``last.pt`` at iteration 2, log rows up to iteration 2)."""
    run = tmp_path_factory.mktemp("interrupted") / "run"
    with pytest.MonkeyPatch.context() as mp:
        _at_step(mp, {3: _crash})
        with pytest.raises(_Crash):
            main(_argv(run, tiny_backbone_file))
    assert _iteration(run) == 2
    return run


def _copy(run: Path, tmp_path: Path) -> Path:
    """A copy of the run folder ``run`` at ``tmp_path/run`` (its config.yaml names the new folder)."""
    copy = shutil.copytree(run, tmp_path / "run")
    (copy / "config.yaml").write_text((run / "config.yaml").read_text().replace(str(run), str(copy)))
    return copy


def _python(code: str, **kwargs) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT / "tests")])}
    return subprocess.Popen([sys.executable, "-c", textwrap.dedent(code)], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **kwargs)


# ------------------------------------------------------------------------------------------
# 1. pre-emption with DataLoader workers
# ------------------------------------------------------------------------------------------


def test_sigterm_to_the_process_group_with_workers_saves_and_resumes_exactly(tmp_path, tiny_backbone_file,
                                                                               reference, capsys):
    """``scancel``/pod termination: SIGTERM to every process of the job, two DataLoader workers."""
    run = tmp_path / "run"
    argv = _argv(run, tiny_backbone_file, "data.num_workers=2")
    child = _python(f"""
        import sys, time
        import hpseg.train as t
        from hpseg.cli import main
        real, n = t.train_step, [0]
        def step(*a, **k):
            out = real(*a, **k)
            n[0] += 1
            if n[0] == 3:
                print("in step 3", flush=True)
                time.sleep(1)  # the rest of the step: the scheduler's signal comes now
            return out
        t.train_step = step
        sys.exit(main({argv!r}))
    """, start_new_session=True)
    assert child.stdout.readline().strip() == "in step 3"
    os.killpg(child.pid, signal.SIGTERM)  # the scheduler signals every process of the job, workers included
    _, err = child.communicate(timeout=120)
    assert child.returncode == 143, err
    lines = _error_lines(err)
    assert len(lines) == 1 and lines[0].startswith("interrupted: SIGTERM: stopped at iteration 3"), err
    assert "resume" in lines[0] and "Traceback" not in err and "DataLoader worker" not in err
    assert err.count("stopping after this step") == 1  # the main process only, not once per worker
    assert _iteration(run) == 3  # mid-epoch: the stop-save, not a periodic one
    assert main(argv) == 0  # the same command resumes
    _assert_same_run(run, reference)


def test_ctrl_c_pressed_again_during_the_stop_save_does_not_cut_it_short(tmp_path, tiny_backbone_file,
                                                                          monkeypatch, capsys):
    run = tmp_path / "run"
    _at_step(monkeypatch, {3: lambda: (os.kill(os.getpid(), signal.SIGINT), os.kill(os.getpid(), signal.SIGINT))})
    import hpseg.checkpointing as checkpointing

    real_save, saves = checkpointing.atomic_torch_save, []

    def impatient_save(obj, path):  # two more Ctrl-C while the stop-save writes last.pt: three in all
        if obj["state"]["iteration"] == 3:
            os.kill(os.getpid(), signal.SIGINT)
            os.kill(os.getpid(), signal.SIGINT)
        real_save(obj, path)
        saves.append(obj["state"]["iteration"])

    monkeypatch.setattr(checkpointing, "atomic_torch_save", impatient_save)
    assert main(_argv(run, tiny_backbone_file)) == 130
    lines = _error_lines(capsys.readouterr().err)
    assert lines == [f"interrupted: SIGINT: stopped at iteration 3, state saved in {run / 'last.pt'}: "
                     "run the same command to resume"]
    assert saves[-1] == 3 and _iteration(run) == 3 and not list(run.glob(".*.tmp"))


# ------------------------------------------------------------------------------------------
# 2. one run per folder
# ------------------------------------------------------------------------------------------


def test_a_second_run_into_a_folder_in_use_is_refused_and_the_first_is_intact(tmp_path, tiny_backbone_file,
                                                                                monkeypatch, reference, capsys):
    run = tmp_path / "run"
    argv = _argv(run, tiny_backbone_file, "train.seed=1")  # other settings: it would overwrite the first's files
    second: dict[str, object] = {}

    def start_the_same_command_again() -> None:
        child = _python(f"import sys; from hpseg.cli import main; sys.exit(main({argv!r}))")
        second["err"] = child.communicate(timeout=120)[1]
        second["rc"] = child.returncode

    _at_step(monkeypatch, {2: start_the_same_command_again})
    assert main(_argv(run, tiny_backbone_file)) == 0
    lines = _error_lines(str(second["err"]))
    assert second["rc"] == 2 and len(lines) == 1, second["err"]
    assert lines[0].startswith(f"error: {run} is in use by another hpseg run (pid {os.getpid()} on ")
    _assert_same_run(run, reference)  # seed 0's run, no row twice, nothing of seed 1


def test_the_lock_names_its_holder_and_is_taken_over_when_the_holder_dies(tmp_path, caplog):
    folder = tmp_path / "run"
    holder = _python(f"""
        import sys
        from pathlib import Path
        from hpseg.preemption import run_folder_lock
        with run_folder_lock(Path({str(folder)!r})):
            print("locked", flush=True)
            sys.stdin.read()
    """, stdin=subprocess.PIPE)
    assert holder.stdout.readline().strip() == "locked"
    with pytest.raises(RunFolderBusy, match=rf"in use by another hpseg run \(pid {holder.pid} on "):
        with run_folder_lock(folder):
            pass
    holder.kill()  # SIGKILL: no clean-up, the lock file stays with its pid inside
    holder.wait()
    assert (folder / LOCK_NAME).is_file()
    caplog.set_level("INFO", logger="hpseg")
    with run_folder_lock(folder) as lock, run_folder_lock(folder) as nested:
        assert lock.locked and nested is lock  # a folder this process holds is held once more
    assert f"pid {holder.pid}" in caplog.text and "taken over" in caplog.text
    assert not (folder / LOCK_NAME).exists()


# ------------------------------------------------------------------------------------------
# 3-4. a log that matches the checkpoint
# ------------------------------------------------------------------------------------------


def test_sigkill_before_the_first_save_leaves_no_rows_and_no_temporaries(tmp_path, tiny_backbone_file, reference):
    run = tmp_path / "run"
    argv = _argv(run, tiny_backbone_file)
    child = _python(f"""
        import os, signal, sys
        import hpseg.train as t
        from hpseg.cli import main
        real, n = t.train_step, [0]
        def step(*a, **k):
            n[0] += 1
            if n[0] == 2:  # in its second step: iteration 0 is logged, nothing is saved yet
                os.kill(os.getpid(), signal.SIGKILL)
            return real(*a, **k)
        t.train_step = step
        sys.exit(main({argv!r}))
    """)
    child.communicate(timeout=120)
    assert child.returncode == -signal.SIGKILL
    assert not (run / "last.pt").exists() and _rows(run) and (run / LOCK_NAME).is_file()  # the dead run's
    (run / ".best.pt.k3j9x_q2.tmp").write_bytes(b"half a checkpoint")  # a save killed mid-write
    keep = run / ".notes.tmp"  # not a temporary of hpseg's
    keep.write_text("mine")
    assert main(argv) == 0  # the lock of the dead run is taken over
    assert _rows(run) == _rows(reference)  # iterations 0, 1, 2, …: nothing of the dead run
    keep.unlink()
    _assert_same_run(run, reference)


def test_a_torn_last_log_line_is_dropped_on_resume_and_said(tmp_path, tiny_backbone_file, interrupted, reference,
                                                            capsys):
    run = _copy(interrupted, tmp_path)
    with (run / "metrics.jsonl").open("a") as fh:
        fh.write('{"iteration": 3, "epoch": 1, "loss": 4.1')  # the crash came mid-line
    assert main(_argv(run, tiny_backbone_file)) == 0
    assert capsys.readouterr().err.count("dropped 1 unreadable line(s) (line 4; a crash while writing it)") == 1
    _assert_same_run(run, reference)


def test_the_save_signal_saves_and_goes_on(tmp_path, tiny_backbone_file, monkeypatch, reference):
    run = tmp_path / "run"
    _at_step(monkeypatch, {3: lambda: os.kill(os.getpid(), signal.SIGUSR1), 4: _crash})
    with pytest.raises(_Crash):
        main(_argv(run, tiny_backbone_file, "train.save_on_signal=SIGUSR1"))
    assert _iteration(run) == 3  # saved after the step it arrived in, then trained on
    monkeypatch.undo()
    assert main(_argv(run, tiny_backbone_file)) == 0
    _assert_same_run(run, reference)


# ------------------------------------------------------------------------------------------
# 5. one line for every damaged file or failed write
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("damage", ["truncated", "random", "empty", "text"])
def test_a_damaged_last_pt_is_one_line_naming_it_and_touches_nothing(tmp_path, tiny_backbone_file, interrupted,
                                                                     damage, capsys):
    run = _copy(interrupted, tmp_path)
    last = run / "last.pt"
    whole = last.read_bytes()
    last.write_bytes({"truncated": whole[: len(whole) // 2], "random": os.urandom(4096), "empty": b"",
                      "text": b"iteration: 2\n"}[damage])
    before = _snapshot(run)
    assert main(_argv(run, tiny_backbone_file)) == 2
    lines = _error_lines(capsys.readouterr().err)
    assert len(lines) == 1 and lines[0].startswith(f"error: cannot read {last}: "), lines
    assert "delete it to start the run over" in lines[0] and "weights_only=False" not in lines[0]
    assert _snapshot(run) == before


def test_a_full_disk_is_one_line_keeps_every_file_and_the_run_resumes_exactly(tmp_path, tiny_backbone_file,
                                                                              interrupted, reference, monkeypatch,
                                                                              capsys):
    import builtins

    import hpseg.io as io_module

    run = _copy(interrupted, tmp_path)
    kept = {name: (run / name).read_bytes() for name in ("last.pt", "best.pt")}

    class FullDisk:
        """A checkpoint being written when the disk fills up (torch.save wraps the OSError)."""

        def __init__(self, fh) -> None:
            self.fh, self.written = fh, 0

        def write(self, data) -> int:
            self.written += len(data)
            if self.written > 2000:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            return self.fh.write(data)

        def __getattr__(self, name):
            return getattr(self.fh, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc) -> None:
            self.fh.close()

    def open_on_a_full_disk(path, *args, **kwargs):
        fh = builtins.open(path, *args, **kwargs)
        return FullDisk(fh) if ".pt." in Path(path).name else fh

    monkeypatch.setattr(io_module, "open", open_on_a_full_disk, raising=False)
    assert main(_argv(run, tiny_backbone_file)) == 2  # the first save after resuming: best.pt at iteration 4
    lines = _error_lines(capsys.readouterr().err)
    assert len(lines) == 1 and re.match(rf"error: cannot write {re.escape(str(run))}/(best|last)\.pt: No space left "
                                        "on device: free space", lines[0]), lines
    assert {name: (run / name).read_bytes() for name in kept} == kept and not (run / "final.pt").exists()
    assert not list(run.glob(".*.tmp"))
    monkeypatch.undo()
    assert main(_argv(run, tiny_backbone_file)) == 0  # space freed: the same command resumes exactly
    _assert_same_run(run, reference)


def test_a_read_only_run_folder_is_one_line(tmp_path, tiny_backbone_file, interrupted, monkeypatch, capsys):
    run = _copy(interrupted, tmp_path)
    run.chmod(0o555)
    try:
        probe = run / "probe"
        try:
            probe.write_text("x")  # root writes anyway (CI runs as root): refuse like the file system would
            probe.unlink()
            import tempfile

            import hpseg.io as io_module

            def refused(*args, dir=None, **kwargs):
                raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), dir)

            monkeypatch.setattr(io_module.tempfile, "mkstemp", refused)
            assert io_module.tempfile is tempfile
        except PermissionError:
            pass
        before = _snapshot(run)
        assert main(_argv(run, tiny_backbone_file)) == 2
        lines = _error_lines(capsys.readouterr().err)
        assert len(lines) == 1 and lines[0].startswith(f"error: cannot write {run}/"), lines
        assert "Permission denied: make the folder writable" in lines[0]
        assert _snapshot(run) == before
    finally:
        run.chmod(0o755)


def test_write_errors_name_the_path_and_the_os_error(tmp_path):
    from hpseg.io import atomic_torch_save, write_error

    wrapped = RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")
    wrapped.__context__ = OSError(errno.ENOSPC, "No space left on device")
    error = write_error(tmp_path / "last.pt", wrapped)
    assert isinstance(error, HPSegError) and str(error).startswith(f"cannot write {tmp_path / 'last.pt'}: No space")
    assert "unexpected pos" not in str(error)
    assert write_error(tmp_path / "x", OSError(errno.ENOENT, "No such file")) is None  # not a user's fix
    atomic_torch_save({"a": 1}, tmp_path / "ok.pt")  # and a write that works still works
    assert torch.load(tmp_path / "ok.pt", weights_only=True) == {"a": 1}


def test_a_log_line_that_cannot_be_written_is_one_line(tmp_path, monkeypatch):
    from hpseg.checkpointing import Checkpointer
    from hpseg.runtime import Runtime

    ckpt = Checkpointer(tmp_path, Runtime.create("cpu", "fp32"), {})
    ckpt.log({"iteration": 0, "loss": 1.0})
    real_open = Path.open

    def full(self, mode="r", *args, **kwargs):
        if self.name == "metrics.jsonl" and mode == "a":
            raise OSError(errno.EDQUOT, os.strerror(errno.EDQUOT))
        return real_open(self, mode, *args, **kwargs)

    monkeypatch.setattr(Path, "open", full)
    with pytest.raises(HPSegError, match=rf"cannot write {re.escape(str(ckpt.metrics_path))}: Disk quota exceeded"):
        ckpt.log({"iteration": 1, "loss": 1.0})


# ------------------------------------------------------------------------------------------
# 6. multi-seed resume
# ------------------------------------------------------------------------------------------


def test_a_resumed_multi_seed_run_says_which_seeds_are_finished_and_which_continue(tmp_path, monkeypatch, capsys,
                                                                                   caplog):
    from hpseg import pipeline
    from hpseg.runtime import Runtime

    run = tmp_path / "run"
    for seed, files in {0: ("final.pt", "train_summary.json"), 1: ("last.pt",)}.items():
        (run / f"seed-{seed}").mkdir(parents=True)
        for name in files:
            (run / f"seed-{seed}" / name).write_bytes(b"x")
    caplog.set_level("INFO", logger="hpseg")
    pipeline._say_seed_states(run, [0, 1, 2], Runtime.create("cpu", "fp32"))
    assert "finished seed-0 (left as they are); continuing seed-1 from last.pt; new seed-2" in caplog.text

    folders = [run / f"seed-{s}" for s in (0, 1)]
    monkeypatch.setattr(pipeline, "run_training", lambda cfg: pipeline.TrainingRun(folders, True, folders[:1]))
    assert main(["train", "--preset", "synthetic", f"train.out_dir={run}", "train.seeds=[0,1]"]) == 0
    out = capsys.readouterr().out
    assert f"{folders[0]}: finished before this command, left as it was" in out
    assert f"run folder: {folders[1]}" in out and "nothing was changed" not in out


def test_stopped_exits_with_the_signal_s_conventional_status(monkeypatch, capsys):
    from hpseg.cli import commands

    for signum, status in ((signal.SIGINT, 130), (signal.SIGTERM, 143)):
        def stopped(args, signum=signum):
            raise Stopped("SIG: stopped at iteration 3: run the same command to resume", signum)

        monkeypatch.setattr(commands, "cmd_train", stopped)
        assert main(["train", "--preset", "synthetic"]) == status
        assert capsys.readouterr().err.strip() == "interrupted: SIG: stopped at iteration 3: run the same command " \
                                                  "to resume"


def test_a_third_ctrl_c_aborts_unless_a_save_is_under_way(caplog):
    import hpseg.checkpointing as checkpointing

    ctrl_c = lambda: os.kill(os.getpid(), signal.SIGINT)  # noqa: E731
    with checkpointing.stop_on_signals("SIGUSR1") as stop:
        os.kill(os.getpid(), signal.SIGUSR1)
        assert stop.save_requested and not stop.requested  # the save signal saves and goes on
        ctrl_c()
        ctrl_c()
        assert stop.requested and stop.signum == signal.SIGINT
        checkpointing._saves_under_way[0] += 1  # a save under way: nothing cuts it short
        try:
            ctrl_c()
        finally:
            checkpointing._saves_under_way[0] -= 1
        with pytest.raises(KeyboardInterrupt, match="aborted without saving"):
            ctrl_c()  # outside a save, the user insists: stop now
    assert signal.getsignal(signal.SIGUSR1) is signal.SIG_DFL  # the handlers are put back
    assert "Ctrl-C 1 more time(s) to abort without saving" in caplog.text


@pytest.mark.parametrize(("name", "text"), [("config.yaml", "data: [unclosed\n"), ("config.yaml", "- a list\n"),
                                            ("train_summary.json", '{"iterations": 4, "be')])
def test_a_damaged_config_or_summary_is_one_line_naming_it(tmp_path, name, text):
    from hpseg.checkpointing import check_run_folder
    from hpseg.config import build_config

    cfg = build_config("synthetic", [])
    run = tmp_path / "run"
    run.mkdir()
    for file, content in {"config.yaml": cfg.to_yaml(), "train_summary.json": "{}", "final.pt": "x"}.items():
        (run / file).write_text(content)
    (run / name).write_text(text)
    with pytest.raises(HPSegError, match=rf"^cannot read {re.escape(str(run / name))}.*delete the run folder") as err:
        check_run_folder(run, cfg.to_dict())
    assert "\n" not in str(err.value)


def test_the_save_signal_is_sigusr1_or_sigusr2():
    from hpseg.config import build_config

    assert build_config("synthetic", ["train.save_on_signal=usr2"]).train.save_on_signal == "usr2"
    with pytest.raises(HPSegError, match="train.save_on_signal must be SIGUSR1 or SIGUSR2"):
        build_config("synthetic", ["train.save_on_signal=SIGTERM"])  # SIGTERM already stops and saves
