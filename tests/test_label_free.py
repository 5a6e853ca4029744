"""Label-free figures: stability, boundary alignment with edges, agreement between partitions."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from hpseg.imaging import normalize
from hpseg.label_free import (
    AgreementMeter,
    BoundaryMeter,
    StabilityMeter,
    agreement_scores,
    edge_map,
    match_clusters,
    photometric_change,
)


def _halves(h: int = 16, w: int = 16) -> torch.Tensor:
    """(1, H, W): cluster 0 on the left half, 1 on the right."""
    m = torch.zeros(1, h, w, dtype=torch.long)
    m[..., w // 2:] = 1
    return m


def test_stability_is_100_for_equal_maps_and_drops_with_disagreement() -> None:
    a = _halves()
    same = StabilityMeter(2)
    same.update(a, a.clone())
    assert same.result() == pytest.approx(100.0)
    shifted = StabilityMeter(2)
    b = torch.zeros_like(a)
    b[..., 12:] = 1  # the boundary moved by four columns: IoU 8/12 (cluster 0) and 4/8 (cluster 1)
    shifted.update(a, b)
    assert shifted.result() == pytest.approx(100 * (8 / 12 + 4 / 8) / 2)
    assert StabilityMeter(3).result() is None


def test_agreement_ignores_renaming_and_is_zero_for_independent_partitions() -> None:
    a = _halves()
    renamed = AgreementMeter(2, 3)
    renamed.update(a, 2 - 2 * a)  # ids 0 → 2, 1 → 0
    assert renamed.result() == pytest.approx({"nmi": 1.0, "ari": 1.0})
    rows = torch.zeros_like(a)
    rows[:, 8:, :] = 1  # top / bottom: independent of left / right
    independent = AgreementMeter(2, 2)
    independent.update(a, rows)
    res = independent.result()
    assert res["nmi"] == pytest.approx(0.0, abs=1e-9) and abs(res["ari"]) < 0.05
    assert agreement_scores(np.array([[5, 0], [0, 0]]))["nmi"] == 1.0  # one cluster each: identical


def test_boundaries_on_the_image_edge_score_higher_than_elsewhere() -> None:
    rgb = torch.zeros(1, 3, 16, 16)
    rgb[..., 8:] = 1.0  # a vertical step edge between columns 7 and 8
    edges = edge_map(normalize(rgb))
    assert bool(edges[0, :, 7:9].all()) and not bool(edges[0, :, :5].any())
    aligned, off = BoundaryMeter(), BoundaryMeter()
    aligned.update(_halves(), edges)
    wrong = torch.zeros_like(_halves())
    wrong[:, 8:, :] = 1  # a horizontal boundary across the flat halves
    off.update(wrong, edges)
    (p_aligned, chance), (p_off, _) = aligned.result(), off.result()
    assert p_aligned == pytest.approx(100.0) and p_off is not None and p_off < 30.0
    assert chance is not None and 0 < chance < 50


def test_photometric_change_changes_colours_but_not_shapes() -> None:
    rgb = torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    out = photometric_change(normalize(rgb))
    assert out.shape == rgb.shape and not torch.allclose(out, normalize(rgb))
    flat = photometric_change(normalize(torch.full((1, 3, 4, 4), 0.5)))
    assert torch.allclose(flat, flat[..., :1, :1].expand_as(flat))


def test_match_clusters_recovers_a_permutation_and_keeps_extra_clusters_apart() -> None:
    table = np.array([[0, 9, 0, 1], [8, 0, 0, 0], [0, 0, 7, 0]])
    mapping = match_clusters(table)
    assert mapping[:3].tolist() == [1, 0, 2] and mapping[3] >= 3
