"""Spherical k-means: recovers separated clusters, seeded, clear errors."""

from __future__ import annotations

import pytest
import torch

from hpseg.clustering import kmeans
from hpseg.errors import HPSegError


def test_kmeans_recovers_separated_clusters():
    g = torch.Generator().manual_seed(0)
    centres = torch.eye(4)[:3] * 5
    x = torch.cat([c + 0.05 * torch.randn(50, 4, generator=g) for c in centres])
    c = kmeans(x, 3, seed=1)
    assign = (torch.nn.functional.normalize(x, dim=1) @ c.T).argmax(1)
    groups = [set(assign[i * 50 : (i + 1) * 50].tolist()) for i in range(3)]
    assert all(len(gr) == 1 for gr in groups) and len(set.union(*groups)) == 3


def test_kmeans_is_seeded():
    x = torch.randn(200, 8, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(kmeans(x, 5, seed=7), kmeans(x, 5, seed=7))


def test_kmeans_needs_enough_samples():
    with pytest.raises(HPSegError, match="at least k=5"):
        kmeans(torch.randn(3, 2), 5)
