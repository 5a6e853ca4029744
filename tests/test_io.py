"""hpseg.io: safe loading names the file and never passes on torch's unsafe advice."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import pytest
import torch

from hpseg.errors import HPSegError
from hpseg.io import safe_torch_load


class _AddOne(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + 1


def _files(tmp_path: Path) -> dict[str, Path]:
    good = tmp_path / "good.pt"
    torch.save({"a": torch.ones(3)}, good)
    data = good.read_bytes()
    files = {
        "random": os.urandom(4096),
        "empty": b"",
        "text": b"not a checkpoint\n",
        "truncated": data[: len(data) // 2],
    }
    out = {}
    for name, content in files.items():
        out[name] = tmp_path / f"{name}.pt"
        out[name].write_bytes(content)
    out["torchscript"] = tmp_path / "script.pt"
    torch.jit.trace(_AddOne(), torch.ones(2)).save(str(out["torchscript"]))
    out["pickle"] = tmp_path / "pickle.pt"
    torch.save({"ns": argparse.Namespace(a=1)}, out["pickle"])
    out["onnx"] = tmp_path / "model.onnx"
    out["onnx"].write_bytes(b"\x08\x07\x12\x07pytorch")
    return out


@pytest.mark.parametrize(
    "name, says",
    [
        ("random", "not a PyTorch file"),
        ("empty", "empty file"),
        ("text", "not a PyTorch file"),
        ("truncated", "not a PyTorch file"),
        ("torchscript", "TorchScript export"),
        ("pickle", "safe loading (weights_only=True) refuses"),
        ("onnx", "ONNX export"),
    ],
)
def test_unreadable_files_are_one_line_naming_the_file(tmp_path: Path, name: str, says: str) -> None:
    path = _files(tmp_path)[name]
    with _no_warnings():
        with pytest.raises(HPSegError) as info:
            safe_torch_load(path, expected="an hpseg checkpoint", fix="give a run folder")
    message = str(info.value)
    assert "\n" not in message
    assert str(path) in message and says in message
    assert message.endswith("expected an hpseg checkpoint: give a run folder")
    assert "weights_only=False" not in message and "will likely succeed" not in message
    assert info.value.__cause__ is None  # torch's own text is not chained into -v output


def test_missing_file_and_good_file(tmp_path: Path) -> None:
    with pytest.raises(HPSegError, match="does not exist"):
        safe_torch_load(tmp_path / "none.pt", expected="x", fix="y")
    good = tmp_path / "good.pt"
    torch.save({"a": torch.arange(3)}, good)
    assert torch.equal(safe_torch_load(good, expected="x", fix="y")["a"], torch.arange(3))


class _no_warnings:
    """Fails if torch warns (its TorchScript warning suggests other loaders)."""

    def __enter__(self) -> None:
        import warnings

        self._ctx = warnings.catch_warnings(record=True)
        self._seen = self._ctx.__enter__()
        warnings.simplefilter("always")

    def __exit__(self, *exc: object) -> None:
        self._ctx.__exit__(*exc)
        assert not [w for w in self._seen if "torch" in str(w.filename) or "TorchScript" in str(w.message)]
