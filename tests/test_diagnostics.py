"""Diagnostics of hidden positives and of the cluster probe, on cases with known answers."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from hpseg.diagnostics import (
    PositiveCounts,
    PositiveStats,
    assignment_miou,
    cluster_usage,
    kmeans_code_miou,
    patch_labels,
    positive_counts,
)
from hpseg.errors import HPSegError

# -- patch labels ---------------------------------------------------------------------------


def test_patch_labels_majority_ignore_and_ties():
    label = torch.tensor(
        [
            [
                [0, 0, 1, 1],
                [0, 1, 1, 1],
                [-1, -1, 2, 3],
                [-1, -1, 3, 2],
            ]
        ]
    )
    out = patch_labels(label, (2, 2))
    assert out.dtype == torch.int64 and out.shape == (1, 2, 2)
    # top-left 3×0 + 1×1 → 0; top-right all 1; bottom-left unlabelled → −1; bottom-right 2:2 tie → 2
    assert out.tolist() == [[[0, 1], [-1, 2]]]


def test_patch_labels_grid_of_vit_patches_and_uneven_grids():
    label = torch.arange(4).repeat_interleave(8).view(1, 1, 32).expand(2, 16, 32).clone()  # 4 vertical bands
    out = patch_labels(label, (2, 4))
    assert out.shape == (2, 2, 4) and out[0, 0].tolist() == [0, 1, 2, 3] and torch.equal(out[0], out[1])
    uneven = patch_labels(torch.zeros(1, 10, 10, dtype=torch.long), (3, 3))
    assert uneven.tolist() == [[[0, 0, 0]] * 3]
    assert patch_labels(torch.full((1, 4, 4), -1), (2, 2)).eq(-1).all()
    with pytest.raises(HPSegError):
        patch_labels(torch.zeros(1, 4, 4), (2, 2))  # float labels
    with pytest.raises(HPSegError):
        patch_labels(torch.zeros(1, 4, 4, dtype=torch.long), (5, 5))


# -- hidden positives: a batch built to have known masks ---------------------------------------


def _known_batch() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Ten patches whose positives are known exactly.

    Task-agnostic: features e0 (5 patches), e1 (4 patches), e2 (1 isolated patch); the pool's only
    entry is (e0+e1+e2)/√3, so every threshold is 1/√3: patches sharing a direction are
    positives (similarity 1), others are not (0); the isolated patch has none and is dropped.
    Labels: e0 group [0, 0, 0, 1, −1], e1 group [2, 2, 2, 3], isolated patch 4.
      A: 5·4 + 4·3 = 32 pairs; labelled 4·3 + 4·3 = 24; agreeing 3·2 + 3·2 = 12 → precision 1/2.
    Task-specific: one-hot code per direction d0..d3, pool (1,1,1,1)/2 (thresholds 1/2):
      d0 = {three label-0 patches, the unlabelled one}, d1 = {label-1}, d2 = {three label-2},
      d3 = {label-3, isolated (label 4)}.
      T: 4·3 + 0 + 3·2 + 2·1 = 20 pairs; labelled 3·2 + 6 + 2 = 14; agreeing 6 + 6 + 0 = 12 → 6/7.
    """
    eye3, eye4 = torch.eye(3), torch.eye(4)
    f = torch.stack([eye3[0]] * 5 + [eye3[1]] * 4 + [eye3[2]])
    s = torch.stack([eye4[0]] * 3 + [eye4[1], eye4[0]] + [eye4[2]] * 3 + [eye4[3], eye4[3]])
    labels = torch.tensor([0, 0, 0, 1, -1, 2, 2, 2, 3, 4])
    pool_a = F.normalize(torch.ones(1, 3), dim=1)
    pool_s = F.normalize(torch.ones(1, 4), dim=1)
    return f, s, pool_a, pool_s, labels


@pytest.mark.parametrize("block_rows", [1, 3, 10, 4096])
def test_positive_counts_on_a_batch_with_known_precision(block_rows: int):
    f, s, pool_a, pool_s, labels = _known_batch()
    c = positive_counts(f, s, pool_a, pool_s, labels, block_rows=block_rows)
    assert c == PositiveCounts(
        anchors=10,
        kept_anchors=9,
        pairs_agnostic=32,
        labelled_agnostic=24,
        agreeing_agnostic=12,
        pairs_specific=20,
        labelled_specific=14,
        agreeing_specific=12,
    )
    summary = c.summary()
    assert summary["positive_precision_agnostic"] == 0.5
    assert summary["positive_precision_specific"] == pytest.approx(6 / 7)
    assert summary["positives_per_anchor"] == pytest.approx(3.2)
    assert summary["positives_per_anchor_specific"] == pytest.approx(2.0)
    assert summary["kept_anchor_fraction"] == pytest.approx(0.9)


def test_positive_stats_sums_batches_and_omits_undefined_precision():
    f, s, pool_a, pool_s, labels = _known_batch()
    stats = PositiveStats()
    assert stats.result() == {}
    stats.update(f, s, pool_a, pool_s, labels)
    # a second batch without any label: counts pairs and anchors, adds nothing to precision
    batch = stats.update(f, s, pool_a, pool_s, torch.full_like(labels, -1))
    assert batch.labelled_agnostic == 0 and batch.pairs_agnostic == 32
    out = stats.result()
    assert out["positive_precision_agnostic"] == 0.5
    assert out["positives_per_anchor"] == pytest.approx(3.2) and out["kept_anchor_fraction"] == pytest.approx(0.9)
    unlabelled = PositiveStats()
    unlabelled.update(f, s, pool_a, pool_s, torch.full_like(labels, -1))
    res = unlabelled.result()
    assert "positive_precision_agnostic" not in res and "positive_precision_specific" not in res
    assert all(math.isfinite(v) for v in res.values())


def test_positive_counts_follow_the_loss_masks_on_random_data():
    """On random features the counts equal a direct evaluation of the mask rule."""
    g = torch.Generator().manual_seed(0)
    f = F.normalize(torch.randn(60, 8, generator=g), dim=1)
    s = F.normalize(torch.randn(60, 5, generator=g), dim=1)
    pool_a = F.normalize(torch.randn(7, 8, generator=g), dim=1)
    pool_s = F.normalize(torch.randn(7, 5, generator=g), dim=1)
    labels = torch.randint(-1, 3, (60,), generator=g)
    c = positive_counts(f, s, pool_a, pool_s, labels, block_rows=16)

    def rule(x: torch.Tensor, pool: torch.Tensor) -> torch.Tensor:
        r = (x @ pool.T).amax(1)
        sim = x @ x.T
        m = (sim > r[:, None]) | (sim > r[None, :])
        m.fill_diagonal_(False)
        return m

    a, t = rule(f, pool_a), rule(s, pool_s)
    both = (labels[:, None] >= 0) & (labels[None, :] >= 0)
    agree = both & (labels[:, None] == labels[None, :])
    assert c.pairs_agnostic == int(a.sum()) and c.pairs_specific == int(t.sum())
    assert c.labelled_agnostic == int((a & both).sum()) and c.agreeing_agnostic == int((a & agree).sum())
    assert c.agreeing_specific == int((t & agree).sum())
    assert c.kept_anchors == int(a.any(1).sum())


# -- k-means on the code and cluster usage ----------------------------------------------------


def _blobs(sizes: list[int], dim: int = 8, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    centres = torch.eye(dim)[: len(sizes)] * 10
    x = torch.cat([centres[i] + 0.1 * torch.randn(n, dim, generator=g) for i, n in enumerate(sizes)])
    blob = torch.cat([torch.full((n,), i) for i, n in enumerate(sizes)])
    return x, blob


def test_kmeans_code_miou_on_separable_clusters():
    x, blob = _blobs([30, 20, 25])
    assert kmeans_code_miou(x, blob, 3, seed=0) == pytest.approx(100.0)
    assert kmeans_code_miou(x, (blob + 1) % 3, 3, seed=1) == pytest.approx(100.0)  # names do not matter
    # blob 1 holds two classes half and half: IoU 1 (class 0), 1/2 (matched class), 0 (the other)
    x2, blob2 = _blobs([10, 10])
    labels = blob2.clone()
    labels[15:] = 2
    assert kmeans_code_miou(x2, labels, 2, n_classes=3) == pytest.approx(50.0)
    # unlabelled patches are left out; too few labelled ones give None
    labels_ignored = torch.cat([blob, torch.full((5,), -1)])
    x_more = torch.cat([x, torch.randn(5, 8)])
    assert kmeans_code_miou(x_more, labels_ignored, 3) == pytest.approx(100.0)
    assert kmeans_code_miou(x[:2], torch.tensor([0, -1]), 2) is None


def test_assignment_miou_scores_a_probe_like_the_evaluation():
    labels = torch.tensor([0, 0, 1, 1, 2, 2, -1])
    assert assignment_miou(torch.tensor([2, 2, 0, 0, 1, 1, 0]), labels, 3) == pytest.approx(100.0)
    # one empty cluster: class 2 is never predicted
    assert assignment_miou(torch.tensor([0, 0, 1, 1, 1, 1, 0]), labels, 3) == pytest.approx((1 + 0.5 + 0) / 3 * 100)
    assert assignment_miou(torch.tensor([0, 1]), torch.tensor([-1, -1]), 2) is None


def test_cluster_usage_on_known_cluster_sizes():
    def sizes(assign: torch.Tensor, k: int) -> torch.Tensor:
        return torch.bincount(assign.flatten(), minlength=k)

    balanced = cluster_usage(sizes(torch.tensor([0, 0, 1, 1, 2, 2, 3, 3]), 4))
    assert balanced == {"cluster_entropy": pytest.approx(1.0), "empty_clusters": 0}
    half = cluster_usage(sizes(torch.tensor([[0, 1], [1, 0]]), 4))  # two of four clusters, equally
    assert half["cluster_entropy"] == pytest.approx(0.5) and half["empty_clusters"] == 2
    collapsed = cluster_usage(sizes(torch.zeros(50, dtype=torch.long), 5))
    assert collapsed == {"cluster_entropy": 0.0, "empty_clusters": 4}
    assert cluster_usage([3]) == {"cluster_entropy": 0.0, "empty_clusters": 0}
    assert cluster_usage([0, 0]) == {"cluster_entropy": 0.0, "empty_clusters": 2}
    with pytest.raises(HPSegError, match="non-negative"):
        cluster_usage([4, -1, 2])


def test_positives_per_anchor_describes_a_full_batch_whatever_the_validation_size() -> None:
    """A validation set smaller than one training batch gives the positives an anchor would get
    among a full batch's candidates, not the raw count of its smaller batch."""
    from torch.utils.data import DataLoader

    from hpseg.backbones import BackboneArch, backbone_from_arch
    from hpseg.diagnostics import hidden_positive_diagnostics
    from hpseg.model import HPModel
    from hpseg.runtime import Runtime

    torch.manual_seed(0)
    model = HPModel.create(backbone_from_arch(BackboneArch("dino_custom", 8, 32, 1, 1, (4, 4))), dim=8,
                           n_classes=3, n_clusters=3).eval()
    g = torch.Generator().manual_seed(1)
    items = [{"img": torch.randn(3, 32, 32, generator=g), "label": torch.full((32, 32), -1)} for _ in range(4)]
    pools = (F.normalize(torch.randn(6, 32, generator=g), dim=1), F.normalize(torch.randn(6, 8, generator=g), dim=1))
    cpu = Runtime.create("cpu", "fp32")

    def run(batch_size: int) -> dict:
        loader = DataLoader(items, batch_size=batch_size)
        return hidden_positive_diagnostics(model, loader, *pools, cpu, tau=0.8, sigma=28.0)

    full, partial = run(4), run(8)  # the same four images: a full batch of 4, a partial batch of 8
    n4, n8 = 4 * 16, 8 * 16  # patches of a 4x4 grid per image
    assert full["positives_per_anchor"] > 0
    assert partial["positives_per_anchor"] == pytest.approx(full["positives_per_anchor"] * (n8 - 1) / (n4 - 1))
    assert partial["kept_anchor_fraction"] == full["kept_anchor_fraction"]
