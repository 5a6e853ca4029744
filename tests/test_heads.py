"""Segmentation/EMA/projection heads and the two probes."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from hpseg.heads import ClusterProbe, EMAHead, LinearProbe, ProjectionHead, SegmentationHead

AUTHORS_TO_OURS = {
    "cluster1.0.": "head.linear.",
    "cluster2.": "head.nonlinear.",
    "ema_model1.0.": "ema_head.linear.",
    "ema_model2.": "ema_head.nonlinear.",
}


def _rename(key: str) -> str:
    for old, new in AUTHORS_TO_OURS.items():
        if key.startswith(old):
            return new + key[len(old) :]
    raise KeyError(key)


@pytest.fixture(scope="module")
def golden_heads(golden_file, load_golden) -> tuple[SegmentationHead, EMAHead, dict]:
    path = golden_file("hp_ckpt_small.pth")
    net = torch.load(path, map_location="cpu", weights_only=True)["net_model_state_dict"]
    g = load_golden("featurizer_small.pt")
    head = SegmentationHead(384, g["dim"])
    ema = EMAHead(head)
    for key, value in net.items():
        if key.startswith("model."):
            continue
        module, _, rest = _rename(key).partition(".")
        (head if module == "head" else ema).get_parameter(rest).data.copy_(value)
    return head.eval(), ema.eval(), g


def test_golden_head_codes(golden_heads) -> None:
    head, ema, g = golden_heads
    with torch.no_grad():
        torch.testing.assert_close(head(g["backbone_feats"]), g["code"], atol=1e-5, rtol=0)
        torch.testing.assert_close(ema(g["backbone_feats"]), g["code_ema_train"], atol=1e-5, rtol=0)


def test_golden_ema_step(golden_heads) -> None:
    head, ema, g = golden_heads
    ema = EMAHead(head)  # fresh copy to keep the fixture untouched
    ema.load_state_dict(golden_heads[1].state_dict())
    ema.ema_update(head, g["ema_m"])
    after = g["heads_after_ema_step"]
    ours = {
        **{f"head.{k}": v for k, v in head.state_dict().items()},
        **{f"ema_head.{k}": v for k, v in ema.state_dict().items()},
    }
    for key, value in after.items():
        torch.testing.assert_close(ours[_rename(key)], value, atol=1e-5, rtol=0)
    with torch.no_grad():
        torch.testing.assert_close(ema(g["backbone_feats"]), g["eval_code_ema"], atol=1e-5, rtol=0)


def test_segmentation_head_eval_is_sum_of_branches() -> None:
    torch.manual_seed(0)
    head = SegmentationHead(16, 8).eval()
    x = torch.randn(2, 16, 5, 5)
    with torch.no_grad():
        torch.testing.assert_close(head(x), head.linear(x) + head.nonlinear(x))
    assert isinstance(head.linear, torch.nn.Conv2d) and head.linear.kernel_size == (1, 1)
    assert [type(m).__name__ for m in head.nonlinear] == ["Conv2d", "ReLU", "Conv2d"]


def test_segmentation_head_draws_one_dropout_mask_per_branch() -> None:
    torch.manual_seed(0)
    head = SegmentationHead(32, 8, dropout=0.5).train()
    x = torch.randn(2, 32, 4, 4)
    torch.manual_seed(123)
    out = head(x)
    torch.manual_seed(123)
    d1 = F.dropout2d(x, 0.5, True)
    d2 = F.dropout2d(x, 0.5, True)
    assert not torch.equal(d1, d2)  # different channel masks
    torch.testing.assert_close(out, head.linear(d1) + head.nonlinear(d2))


def test_ema_head_is_a_frozen_deterministic_copy() -> None:
    torch.manual_seed(0)
    head = SegmentationHead(16, 8)
    ema = EMAHead(head).train()
    assert not any(p.requires_grad for p in ema.parameters())
    x = torch.randn(1, 16, 3, 3)
    head.eval()
    with torch.no_grad():
        torch.testing.assert_close(ema(x), head(x))
        torch.testing.assert_close(ema(x), ema(x))
    for p_ema, p in zip(ema.parameters(), head.parameters()):
        assert p_ema.data_ptr() != p.data_ptr()


def test_ema_head_optional_dropout_draws_one_mask_per_branch() -> None:
    torch.manual_seed(0)
    ema = EMAHead(SegmentationHead(32, 8)).eval()
    x = torch.randn(2, 32, 4, 4)
    torch.manual_seed(5)
    out = ema(x, dropout=0.5)
    torch.manual_seed(5)
    d1, d2 = F.dropout2d(x, 0.5, True), F.dropout2d(x, 0.5, True)
    with torch.no_grad():
        torch.testing.assert_close(out, ema.linear(d1) + ema.nonlinear(d2))


def test_ema_update_formula_and_buffers() -> None:
    torch.manual_seed(0)
    head = SegmentationHead(8, 4)
    head.register_buffer("seen", torch.zeros(1))
    ema = EMAHead(head)
    ema.register_buffer("seen", torch.zeros(1))
    before = {k: v.clone() for k, v in ema.named_parameters()}
    with torch.no_grad():
        for p in head.parameters():
            p.add_(1.0)
        head.seen.fill_(7.0)
    ema.ema_update(head, 0.9)
    online = dict(head.named_parameters())
    for k, v in ema.named_parameters():
        torch.testing.assert_close(v, 0.9 * before[k] + 0.1 * online[k].detach())
    assert ema.seen.item() == 7.0


def test_projection_head_normalises() -> None:
    proj = ProjectionHead(8)
    z = proj(torch.randn(10, 8))
    assert z.shape == (10, 8)
    torch.testing.assert_close(z.norm(dim=1), torch.ones(10))


def test_linear_probe_is_a_1x1_conv_with_authors_keys() -> None:
    probe = LinearProbe(8, 5)
    assert probe.n_classes == 5
    assert set(probe.state_dict()) == {"weight", "bias"}
    assert probe(torch.randn(2, 8, 3, 4)).shape == (2, 5, 3, 4)


def test_cluster_probe_matches_stego_definition() -> None:
    torch.manual_seed(0)
    probe = ClusterProbe(8, 4)
    assert probe.clusters.shape == (4, 8) and probe.n_clusters == 4
    code = torch.randn(2, 8, 3, 3)
    cos = torch.einsum("bchw,kc->bkhw", F.normalize(code, dim=1), F.normalize(probe.clusters, dim=1))
    loss, probs = probe(code)
    onehot = F.one_hot(cos.argmax(1), 4).permute(0, 3, 1, 2).float()
    torch.testing.assert_close(probs, onehot)
    torch.testing.assert_close(loss, -(onehot * cos).sum(1).mean())
    loss_a, soft = probe(code, 3.0)
    torch.testing.assert_close(soft, torch.softmax(3.0 * cos, 1))
    torch.testing.assert_close(loss_a, -(soft * cos).sum(1).mean())
    loss_l, logp = probe(code, 3.0, log_probs=True)
    torch.testing.assert_close(logp, torch.log_softmax(3.0 * cos, 1))
    torch.testing.assert_close(loss_l, loss_a)
    with pytest.raises(ValueError):
        probe(code, None, log_probs=True)


def test_cluster_probe_loss_trains_centroids() -> None:
    probe = ClusterProbe(4, 2)
    loss, _ = probe(torch.randn(1, 4, 2, 2))
    loss.backward()
    assert probe.clusters.grad is not None
