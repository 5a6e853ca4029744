"""Export to ONNX / TorchScript: parity with PyTorch, dynamic batch, metadata, CLI."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from hpseg.backbones import BackboneArch, backbone_from_arch
from hpseg.checkpoint import save_checkpoint
from hpseg.cli import main
from hpseg.errors import HPSegError
from hpseg.export import export_model, run_exported
from hpseg.model import HPModel

ONNX_MISSING = [m for m in ("onnx", "onnxruntime") if importlib.util.find_spec(m) is None]
SIZE = (40, 24)  # multiples of the patch size 8, not square, not the 32 px position grid


def needs(fmt: str) -> None:
    if fmt == "onnx" and ONNX_MISSING:
        pytest.skip(f"ONNX export test needs {' and '.join(ONNX_MISSING)}: pip install 'hpseg[export]'")


def tiny_model(arch: BackboneArch | None = None) -> HPModel:
    torch.manual_seed(0)
    bb = backbone_from_arch(arch or BackboneArch("dino_custom", 8, 64, 2, 1, (4, 4)))
    return HPModel.create(bb, dim=16, n_classes=3, n_clusters=4, class_names=["a", "b", "c"]).eval()


@pytest.fixture(scope="module")
def model() -> HPModel:
    return tiny_model()


def reference(model: HPModel, x: torch.Tensor, head: str) -> torch.Tensor:
    """Scores from the model's own forward (backbone → head → probe at the image size)."""
    with torch.no_grad():
        if head == "linear":
            return model.predict(x)["linear"]
        code = F.interpolate(
            model.encode(x, with_attention=False)["code"],
            size=x.shape[-2:],
            mode="bilinear",
            align_corners=False,
        )
        return model.cluster_probe.cosine(code)


@pytest.mark.parametrize("fmt", ["onnx", "torchscript"])
@pytest.mark.parametrize("head", ["linear", "cluster"])
def test_export_matches_pytorch(model: HPModel, tmp_path: Path, fmt: str, head: str) -> None:
    needs(fmt)
    path = export_model(model, tmp_path / f"m.{fmt}", format=fmt, image_size=SIZE, head=head)
    x = torch.randn(3, 3, *SIZE, generator=torch.Generator().manual_seed(1))  # batch 3: dynamic axis
    out = run_exported(path, x, fmt)
    ref = reference(model, x, head)
    assert out.shape == (3, 3 if head == "linear" else 4, *SIZE)
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=0)
    if head == "cluster":
        assert torch.equal(out.argmax(1), model.predict(x)["cluster"].argmax(1))


@pytest.mark.parametrize("fmt", ["onnx", "torchscript"])
def test_export_timm_vit_with_registers(tmp_path: Path, fmt: str) -> None:
    needs(fmt)
    arch = BackboneArch(
        "vit_small_patch14_reg4_dinov2", 14, 64, 1, 1, (2, 2), num_registers=4, dino_family=False
    )
    model = tiny_model(arch)
    size = (42, 28)
    path = export_model(model, tmp_path / f"r.{fmt}", format=fmt, image_size=size, head="linear")
    x = torch.randn(2, 3, *size, generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(run_exported(path, x, fmt), reference(model, x, "linear"), atol=1e-4, rtol=0)


def test_export_metadata(model: HPModel, tmp_path: Path) -> None:
    needs("onnx")
    import onnx

    path = export_model(model, tmp_path / "m.onnx", image_size=SIZE, head="cluster")
    props = {p.key: p.value for p in onnx.load(str(path)).metadata_props}
    meta = json.loads(props["hpseg"])
    assert (
        meta["head"] == "cluster"
        and meta["image_size"] == list(SIZE)
        and meta["class_names"] == ["a", "b", "c"]
    )
    assert meta["output_names"] == [f"cluster {k}" for k in range(4)]


def test_onnx_axes_and_default_head(model: HPModel, tmp_path: Path) -> None:
    needs("onnx")
    import onnx

    from hpseg.segmenter import DEFAULT_HEAD

    path = export_model(model, tmp_path / "m.onnx", image_size=SIZE)  # default head: the segmenter's
    graph = onnx.load(str(path)).graph

    def dims(v: onnx.ValueInfoProto) -> list:
        return [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]

    assert DEFAULT_HEAD == "cluster" and json.loads(
        {p.key: p.value for p in onnx.load(str(path)).metadata_props}["hpseg"])["head"] == DEFAULT_HEAD
    assert dims(graph.input[0]) == ["batch", 3, *SIZE]
    assert dims(graph.output[0]) == ["batch", 4, *SIZE]  # K clusters; height and width fixed at export


def test_export_rejects_sizes_off_the_patch_grid(model: HPModel, tmp_path: Path) -> None:
    with pytest.raises(HPSegError, match="multiple of the patch size 8"):
        export_model(model, tmp_path / "m.pt", format="torchscript", image_size=(30, 24))
    with pytest.raises(HPSegError, match="onnx or torchscript"):
        export_model(model, tmp_path / "m.xyz", format="tflite")
    assert not list(tmp_path.iterdir())  # nothing half-written


def test_export_cli(model: HPModel, tmp_path: Path, capsys) -> None:
    ckpt = save_checkpoint(tmp_path / "best.pt", model)
    out = tmp_path / "m.ts"
    assert main(["export", str(ckpt), "--out", str(out), "--size", "16", "24", "--head", "cluster"]) == 0
    text = capsys.readouterr().out
    assert "exported torchscript" in text and "verified against PyTorch" in text
    x = torch.randn(1, 3, 16, 24)
    torch.testing.assert_close(run_exported(out, x), reference(model, x, "cluster"), atol=1e-4, rtol=0)
