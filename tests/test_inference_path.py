"""One inference path: evaluation, the segmenter and the exported network all score an image
through ``HPModel.scores`` and give identical logits; inference never computes attention."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from hpseg.backbones import Backbone, BackboneArch, backbone_from_arch
from hpseg.evaluate import evaluate_model
from hpseg.export import export_model, run_exported
from hpseg.imaging import normalize
from hpseg.model import HPModel
from hpseg.runtime import Runtime
from hpseg.segmenter import Segmenter

SIZE = 32


@pytest.fixture(scope="module")
def model() -> HPModel:
    torch.manual_seed(0)
    bb = backbone_from_arch(BackboneArch("dino_custom", 8, 32, 2, 2, (4, 4)))
    return HPModel.create(bb, dim=8, n_classes=3, n_clusters=4).eval()


@pytest.fixture(scope="module")
def image() -> torch.Tensor:
    return torch.rand(3, SIZE, SIZE, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("head", ["cluster", "linear"])
def test_evaluate_segment_and_export_give_identical_scores(model, image, head, tmp_path: Path) -> None:
    x = normalize(image).unsqueeze(0)
    with torch.no_grad():
        reference = model.scores(x, (SIZE, SIZE), heads=(head,))[head]

    # the segmenter (one window, native resolution): its scores are the same tensor
    seg = Segmenter(model, head=head, device="cpu", resolution=None, assignment=None)
    seg_scores = seg._forward(x)
    expected = torch.softmax(reference, 1) if head == "linear" else reference
    assert torch.equal(seg_scores, expected)
    np.testing.assert_array_equal(seg.predict(image), reference[0].argmax(0).numpy())

    # evaluation: the predictions it scores are the argmax of the same scores
    captured: dict[str, torch.Tensor] = {}
    scores = model.scores

    def spy(*args, **kwargs):
        out = scores(*args, **kwargs)
        captured.update(out)
        return out

    model.scores = spy  # type: ignore[method-assign]
    try:
        label = torch.zeros(1, SIZE, SIZE, dtype=torch.long)
        evaluate_model(model, DataLoader([{"img": x[0], "label": label[0]}], batch_size=1), Runtime.create("cpu"))
    finally:
        del model.scores
    assert torch.equal(captured[head], reference)

    # the exported network (TorchScript always; ONNX when installed) runs the same computation
    formats = ["torchscript"] + (["onnx"] if importlib.util.find_spec("onnxruntime") else [])
    for fmt in formats:
        path = export_model(model, tmp_path / f"m.{fmt}", format=fmt, image_size=(SIZE, SIZE), head=head)
        torch.testing.assert_close(run_exported(path, x, fmt), reference, atol=1e-5, rtol=1e-5)


def test_inference_never_computes_attention(model, image, monkeypatch) -> None:
    calls = {"attention": 0}
    real = Backbone.attention_logits

    def counting(self, *args, **kwargs):
        calls["attention"] += 1
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Backbone, "attention_logits", counting)
    x = normalize(image).unsqueeze(0)
    with torch.no_grad():
        model.scores(x)
        model.predict(x)
    Segmenter(model, device="cpu").predict(image)
    label = torch.zeros(SIZE, SIZE, dtype=torch.long)
    evaluate_model(model, DataLoader([{"img": x[0], "label": label}], batch_size=1), Runtime.create("cpu"))
    assert calls["attention"] == 0
    model.encode(x)  # training's path does compute it
    assert calls["attention"] == 1
