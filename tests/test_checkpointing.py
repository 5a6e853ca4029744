"""The state of a run folder: finished with the same settings, other settings, failed starts."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from hpseg.checkpointing import changed_settings, check_run_folder, removed_on_failure, suggest_out_dir
from hpseg.config import build_config
from hpseg.errors import HPSegError


def _finished(folder: Path, cfg) -> None:
    folder.mkdir(parents=True)
    (folder / "config.yaml").write_text(cfg.to_yaml())
    (folder / "final.pt").write_bytes(b"x")
    (folder / "train_summary.json").write_text(json.dumps({"iterations": 7}))


def test_bookkeeping_settings_do_not_make_another_run(tmp_path: Path) -> None:
    cfg = build_config("folder", [f"data.root={tmp_path}", "data.n_classes=4"])
    _finished(tmp_path / "run", cfg)
    same = build_config("folder", [f"data.root={tmp_path}/.", "data.n_classes=4", "train.progress=false",
                                   "data.num_workers=0", "train.device=cpu"])
    summary = check_run_folder(tmp_path / "run", same.to_dict())
    assert summary == {"iterations": 7, "already_finished": True}


def test_other_settings_are_named_with_a_free_folder(tmp_path: Path) -> None:
    cfg = build_config("folder", [f"data.root={tmp_path}", "data.n_classes=4"])
    _finished(tmp_path / "run", cfg)
    (tmp_path / "run-k8").mkdir()  # taken: the next free name is suggested
    other = build_config("folder", [f"data.root={tmp_path}", "data.n_classes=4", "model.n_clusters=8"])
    with pytest.raises(HPSegError, match=r"model.n_clusters None → 8\): .*train.out_dir=\S*run-k8-2"):
        check_run_folder(tmp_path / "run", other.to_dict())
    assert suggest_out_dir(tmp_path / "run", "loss.tau", 0.5).name == "run-tau0.5"


def test_a_resumed_run_may_change_its_length_not_its_data() -> None:
    a = build_config("folder", ["data.root=/x", "data.n_classes=4"]).to_dict()
    longer = build_config("folder", ["data.root=/x", "data.n_classes=4", "train.max_iters=5", "train.lr_head=0.001"])
    assert changed_settings(a, longer.to_dict(), finished=False) == []
    assert [k for k, _, _ in changed_settings(a, longer.to_dict(), finished=True)] == ["train.max_iters",
                                                                                       "train.lr_head"]
    other_data = build_config("folder", ["data.root=/y", "data.n_classes=4"]).to_dict()
    assert changed_settings(a, other_data, finished=False) == [("data.root", "/x", "/y")]


def test_a_failed_start_removes_only_the_folder_it_made(tmp_path: Path) -> None:
    new, old = tmp_path / "new", tmp_path / "old"
    old.mkdir()
    for folder in (new, old):
        with pytest.raises(RuntimeError), removed_on_failure(folder):
            folder.mkdir(exist_ok=True)
            (folder / "config.yaml").write_text("x")
            raise RuntimeError("boom")
    assert not new.exists() and (old / "config.yaml").is_file()
    resumable = tmp_path / "resumable"
    with pytest.raises(RuntimeError), removed_on_failure(resumable):
        (resumable / "seed-0").mkdir(parents=True)
        (resumable / "seed-0" / "last.pt").write_bytes(b"x")
        raise RuntimeError("boom")
    assert (resumable / "seed-0" / "last.pt").is_file()
