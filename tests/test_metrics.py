"""Tests for hpseg.metrics: golden parity, matchings, ignore labels, NaN handling, state."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from hpseg.errors import HPSegError
from hpseg.metrics import SegmentationMetrics

TOL = 1e-4  # percent, as the golden README allows


def _from_confusion(conf: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Flat (preds, target) whose (K, C) confusion is ``conf`` (rows = predictions)."""
    preds, target = [], []
    for k, row in enumerate(conf):
        for c, n in enumerate(row):
            preds += [k] * n
            target += [c] * n
    return torch.tensor(preds), torch.tensor(target)


# ------------------------------------------------------------------ golden parity


@pytest.mark.parametrize("case", ["m_cluster", "m_linear"])
def test_golden_parity(load_golden, case):
    g = load_golden("metrics.pt")[case]
    assert g.get("extra_clusters", 0) == 0
    m = SegmentationMetrics(g["n_classes"], hungarian=g["hungarian"])
    m.update(g["preds"], g["target"])
    res = m.compute()
    assert torch.equal(res["confusion"], g["stats"])  # same orientation: rows = predictions
    assert abs(res["accuracy"] - g["result"]["X_Accuracy"]) < TOL
    assert abs(res["miou"] - g["result"]["X_mIoU"]) < TOL


@pytest.mark.parametrize("case", ["m_cluster", "m_linear"])
def test_golden_parity_matching_spelling_and_batches(load_golden, case):
    g = load_golden("metrics.pt")[case]
    matching = "hungarian" if g["hungarian"] else "none"
    m = SegmentationMetrics(g["n_classes"], n_clusters=g["n_classes"], matching=matching)
    for p, t in zip(g["preds"], g["target"]):  # one image at a time
        m.update(p.unsqueeze(0), t.unsqueeze(0))
    res = m.compute()
    assert abs(res["accuracy"] - g["result"]["X_Accuracy"]) < TOL
    assert abs(res["miou"] - g["result"]["X_mIoU"]) < TOL
    assert sorted(res["assignment"]) == list(range(g["n_classes"]))  # K == C: a permutation


# ------------------------------------------------------------------ over- and under-clustering

# 3 clusters (rows), 2 classes (columns); 15 labelled pixels.
OVER = [
    [5, 1],  # cluster 0: mostly class 0
    [2, 4],  # cluster 1: mostly class 1
    [3, 0],  # cluster 2: only class 0
]


def test_over_clustering_hungarian_by_hand():
    # Hungarian, one-to-one: {0→0, 1→1} matches 5 + 4 = 9 pixels (the best pairing; 2→0 gives 3 + 4).
    # Cluster 2 stays unmatched: its 3 class-0 pixels are false negatives of class 0.
    # accuracy = 9 / 15 = 60 %
    # IoU(0) = tp / (predicted as 0 + labelled 0 - tp) = 5 / (6 + 10 - 5) = 5/11
    # IoU(1) = 4 / (6 + 5 - 4) = 4/7
    preds, target = _from_confusion(OVER)
    m = SegmentationMetrics(2, n_clusters=3, matching="hungarian")
    m.update(preds, target)
    res = m.compute()
    assert res["assignment"] == [0, 1, -1]
    assert res["confusion"].tolist() == OVER
    assert res["matched_confusion"].tolist() == [[5, 1], [2, 4]]
    assert res["n_pixels"] == 15
    assert res["accuracy"] == pytest.approx(100 * 9 / 15)
    assert res["iou"] == pytest.approx([100 * 5 / 11, 100 * 4 / 7])
    assert res["miou"] == pytest.approx(100 * (5 / 11 + 4 / 7) / 2)


def test_unmatched_clusters_are_errors_not_dropped():
    # The authors' update drops predictions >= C; with the same matching that would leave
    # 12 pixels: accuracy 9/12 = 75 % and IoU(0) = 5 / (6 + 7 - 5) = 5/8. We must be lower.
    preds, target = _from_confusion(OVER)
    m = SegmentationMetrics(2, n_clusters=3)
    m.update(preds, target)
    res = m.compute()
    dropped_acc = 100 * 9 / 12
    dropped_miou = 100 * (5 / 8 + 4 / 7) / 2
    assert res["accuracy"] < dropped_acc - 1
    assert res["miou"] < dropped_miou - 1
    assert res["n_pixels"] == 15  # every labelled pixel is in the denominator


def test_over_clustering_majority_by_hand():
    # Majority, many-to-one: 0→0 (5 > 1), 1→1 (4 > 2), 2→0 (3 > 0).
    # class 0 now predicted by clusters 0 and 2: row [5+3, 1+0] = [8, 1]; class 1 row [2, 4].
    # accuracy = (8 + 4) / 15 = 80 %
    # IoU(0) = 8 / (9 + 10 - 8) = 8/11, IoU(1) = 4 / (6 + 5 - 4) = 4/7
    preds, target = _from_confusion(OVER)
    m = SegmentationMetrics(2, n_clusters=3, matching="majority")
    m.update(preds, target)
    res = m.compute()
    assert res["assignment"] == [0, 1, 0]
    assert res["matched_confusion"].tolist() == [[8, 1], [2, 4]]
    assert res["accuracy"] == pytest.approx(80.0)
    assert res["iou"] == pytest.approx([100 * 8 / 11, 100 * 4 / 7])
    assert res["miou"] == pytest.approx(100 * (8 / 11 + 4 / 7) / 2)


def test_over_clustering_without_matching_counts_extra_ids_as_errors():
    # Identity: prediction k is class k; cluster 2 (>= C) maps to nothing, so the
    # numbers equal the Hungarian case above (which happens to pick the identity too).
    preds, target = _from_confusion(OVER)
    m = SegmentationMetrics(2, n_clusters=3, matching="none")
    m.update(preds, target)
    res = m.compute()
    assert res["assignment"] == [0, 1, -1]
    assert res["accuracy"] == pytest.approx(60.0)
    # all-extra predictions: zero accuracy, not NaN and not dropped
    m2 = SegmentationMetrics(2, n_clusters=3, matching="none")
    m2.update(torch.full((4,), 2), torch.tensor([0, 1, 0, 1]))
    res2 = m2.compute()
    assert res2["accuracy"] == 0.0 and res2["miou"] == 0.0


def test_under_clustering_by_hand():
    # 2 clusters, 3 classes: Hungarian {0→0, 1→1} = 4 + 3; class 2 gets no cluster.
    # accuracy = 7 / 11; IoU(0) = 4 / (6 + 4 - 4) = 4/6, IoU(1) = 3 / (5 + 4 - 3) = 3/6,
    # IoU(2) = 0 (labelled, never predicted): counted in the mean, not NaN.
    conf = [[4, 1, 1], [0, 3, 2]]
    preds, target = _from_confusion(conf)
    m = SegmentationMetrics(3, n_clusters=2)
    m.update(preds, target)
    res = m.compute()
    assert res["assignment"] == [0, 1]
    assert res["accuracy"] == pytest.approx(100 * 7 / 11)
    assert res["iou"] == pytest.approx([100 * 4 / 6, 100 * 3 / 6, 0.0])
    assert res["miou"] == pytest.approx(100 * (4 / 6 + 3 / 6 + 0) / 3)


def test_hungarian_is_optimal_one_to_one():
    # brute force over every injective cluster → class map on random small confusions
    g = torch.Generator().manual_seed(0)
    for k, c in [(4, 3), (3, 3), (2, 3)]:
        preds = torch.randint(0, k, (300,), generator=g)
        target = torch.randint(0, c, (300,), generator=g)
        m = SegmentationMetrics(c, n_clusters=k)
        m.update(preds, target)
        conf = m.confusion
        best = 0
        for cols in itertools.permutations(range(c), min(k, c)):
            for rows in itertools.permutations(range(k), min(k, c)):
                best = max(best, sum(int(conf[r, cc]) for r, cc in zip(rows, cols)))
        res = m.compute()
        assert res["accuracy"] == pytest.approx(100 * best / 300)
        maj = SegmentationMetrics(c, n_clusters=k, matching="majority")
        maj.merge(m)
        assert maj.compute()["accuracy"] >= res["accuracy"] - 1e-9  # many-to-one never worse


# ------------------------------------------------------------------ ignore labels and NaN


def test_ignored_labels_change_nothing():
    g = torch.Generator().manual_seed(1)
    preds = torch.randint(0, 4, (2, 8, 8), generator=g)
    target = torch.randint(0, 4, (2, 8, 8), generator=g)
    base = SegmentationMetrics(4)
    base.update(preds, target)
    noisy_target = target.clone()
    noisy_target[0, :3] = -1  # ignore
    noisy_target[1, :2] = 255  # >= C: ignored too
    extra = SegmentationMetrics(4)
    extra.update(torch.cat([preds, preds]), torch.cat([target, torch.full_like(target, -1)]))
    assert torch.equal(extra.confusion, base.confusion)
    m = SegmentationMetrics(4)
    m.update(preds, noisy_target)
    assert m.compute()["n_pixels"] == 2 * 64 - 3 * 8 - 2 * 8
    # uint8 labels with 255 = ignore work too
    m8 = SegmentationMetrics(4)
    m8.update(preds, noisy_target.clamp(min=0).to(torch.uint8).masked_fill(noisy_target < 0, 255))
    assert torch.equal(m8.confusion, m.confusion)


def test_absent_class_iou_is_nan_and_excluded():
    # C = 3 without matching; class 2 neither predicted nor labelled → NaN, not in the mean.
    preds = torch.tensor([0, 0, 1, 1])
    target = torch.tensor([0, 1, 1, 1])
    m = SegmentationMetrics(3, hungarian=False)
    m.update(preds, target)
    res = m.compute()
    # IoU(0) = 1 / (2 + 1 - 1) = 1/2; IoU(1) = 2 / (2 + 3 - 2) = 2/3
    assert res["iou"][:2] == pytest.approx([50.0, 100 * 2 / 3])
    assert math.isnan(res["iou"][2])
    assert res["miou"] == pytest.approx(100 * (1 / 2 + 2 / 3) / 2)
    assert res["accuracy"] == pytest.approx(75.0)


def test_empty_meter_gives_nan():
    res = SegmentationMetrics(3).compute()
    assert math.isnan(res["accuracy"]) and math.isnan(res["miou"])
    assert res["n_pixels"] == 0


# ------------------------------------------------------------------ accumulation and state


def test_batches_equal_one_batch_and_merge():
    g = torch.Generator().manual_seed(2)
    preds = torch.randint(0, 7, (6, 10, 12), generator=g)
    target = torch.randint(-1, 5, (6, 10, 12), generator=g)
    one = SegmentationMetrics(5, n_clusters=7)
    one.update(preds, target)
    many = SegmentationMetrics(5, n_clusters=7)
    for i in range(0, 6, 2):
        many.update(preds[i : i + 2], target[i : i + 2])
    assert torch.equal(one.confusion, many.confusion)
    assert one.compute()["miou"] == many.compute()["miou"]
    a, b = SegmentationMetrics(5, n_clusters=7), SegmentationMetrics(5, n_clusters=7)
    a.update(preds[:3], target[:3])
    b.update(preds[3:], target[3:])
    assert torch.equal(a.merge(b).confusion, one.confusion)
    summed = a.confusion.clone()  # what an all-reduce of per-rank confusions produces
    restored = SegmentationMetrics(5, n_clusters=7)
    restored.load_state_dict({"confusion": summed})
    assert restored.compute()["accuracy"] == one.compute()["accuracy"]
    assert one.all_reduce() is one  # not distributed: a no-op
    one.reset()
    assert int(one.confusion.sum()) == 0


def test_scores_and_one_hot_are_argmaxed():
    g = torch.Generator().manual_seed(3)
    scores = torch.randn(2, 4, 5, 6, generator=g)
    target = torch.randint(0, 3, (2, 5, 6), generator=g)
    a, b, c = (SegmentationMetrics(3, n_clusters=4) for _ in range(3))
    a.update(scores, target)
    b.update(scores.argmax(1), target)
    c.update(torch.nn.functional.one_hot(scores.argmax(1), 4).permute(0, 3, 1, 2), target)
    assert torch.equal(a.confusion, b.confusion) and torch.equal(b.confusion, c.confusion)


def test_legacy_hungarian_flag():
    assert SegmentationMetrics(3, hungarian=True).matching == "hungarian"
    assert SegmentationMetrics(3, hungarian=False).matching == "none"
    assert SegmentationMetrics(3).matching == "hungarian"


# ------------------------------------------------------------------ validation


@pytest.mark.parametrize(
    "kwargs",
    [
        {"n_classes": 0},
        {"n_classes": 3, "n_clusters": 0},
        {"n_classes": 3, "matching": "greedy"},
        {"n_classes": 3, "matching": "majority", "hungarian": True},
        {"n_classes": 3, "matching": "hungarian", "hungarian": False},
        {"n_classes": 3, "n_clusters": True},
    ],
)
def test_bad_construction_raises(kwargs):
    with pytest.raises(HPSegError) as err:
        SegmentationMetrics(**kwargs)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize(
    "preds, target",
    [
        (torch.zeros(2, 4, 4, dtype=torch.long), torch.zeros(2, 4, 5, dtype=torch.long)),  # shape
        (torch.zeros(2, 3, 4, 5), torch.zeros(2, 4, 4, dtype=torch.long)),  # scores, wrong shape
        (torch.zeros(2, 4, 4), torch.zeros(2, 4, 4, dtype=torch.long)),  # float labels
        (torch.full((2, 4, 4), 3), torch.zeros(2, 4, 4, dtype=torch.long)),  # id >= n_clusters
        (torch.full((2, 4, 4), -1), torch.zeros(2, 4, 4, dtype=torch.long)),  # negative id
        (torch.zeros(2, 4, 4, dtype=torch.long), torch.zeros(2, 4, 4)),  # float target
    ],
)
def test_bad_update_raises(preds, target):
    m = SegmentationMetrics(3)
    with pytest.raises(HPSegError) as err:
        m.update(preds, target)
    assert "\n" not in str(err.value)
    assert int(m.confusion.sum()) == 0  # nothing half-added


def test_merge_mismatch_raises():
    with pytest.raises(HPSegError):
        SegmentationMetrics(3).merge(SegmentationMetrics(3, n_clusters=4))
