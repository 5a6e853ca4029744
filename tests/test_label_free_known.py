"""Every label-free figure against a known answer: hand-built scenes and predictors whose figures
are worked out here by hand (plain arithmetic, pair counting), independently of the code under
test, for each step — the transformed view, its inverse, the reference map, the pair compared."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from hpseg.evaluate import label_free_evaluation
from hpseg.imaging import denormalize, normalize
from hpseg.label_free import (
    BoundaryMeter,
    ImageCounts,
    StabilityMeter,
    agreement_scores,
    edge_map,
    pooled_figures,
)
from hpseg.runtime import Runtime

CPU = Runtime.create("cpu", "fp32")


def _loader(rgb: torch.Tensor, batch_size: int = 2) -> DataLoader:
    """Images ``(N, 3, H, W)`` in [0, 1] as the evaluation loader gives them (normalised)."""
    return DataLoader([{"img": img} for img in normalize(rgb)], batch_size=batch_size)


class Recording:
    """A predictor that records the images it is given and labels them with ``rule``."""

    def __init__(self, rule) -> None:  # noqa: ANN001
        self.rule, self.inputs = rule, []

    def __call__(self, images: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        self.inputs.append(images.clone())
        return self.rule(images, size)


def _left_columns(n: int):  # noqa: ANN202
    """Position only: cluster 1 on the first ``n`` columns, 0 elsewhere, whatever the image."""
    def rule(images: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        out = torch.zeros(images.shape[0], *size, dtype=torch.long)
        out[..., :n] = 1
        return out
    return rule


def _bright(threshold: float):  # noqa: ANN202
    """Colour only: cluster 1 where the red value (0-1) exceeds ``threshold``."""
    return lambda images, size: (denormalize(images)[:, 0] > threshold).long()


def test_flip_steps_of_a_position_dependent_predictor() -> None:
    """W = 8, cluster 1 on columns 0-2: the mirror image is labelled the same, flipped back it has
    cluster 1 on columns 5-7. Cluster 0: columns 3-7 vs 0-4 → IoU 2/8; cluster 1: 0-2 vs 5-7 → 0/6."""
    rgb = torch.rand(3, 3, 4, 8, generator=torch.Generator().manual_seed(0))
    predictor = Recording(_left_columns(3))
    out = label_free_evaluation({"pos": (predictor, 2)}, _loader(rgb, 3), CPU)
    original, mirror, changed = predictor.inputs
    by_hand_mirror = torch.from_numpy(np.ascontiguousarray(normalize(rgb).numpy()[..., ::-1]))
    assert torch.equal(original, normalize(rgb))  # the reference map is of the image itself
    assert torch.equal(mirror, by_hand_mirror)  # the view: a left-right mirror, not up-down
    assert not torch.equal(changed, original)
    figures = out.figures["methods"]["pos"]
    assert figures["flip_stability"] == pytest.approx(100 * (2 / 8 + 0 / 6) / 2)
    assert figures["photometric_stability"] == pytest.approx(100.0)  # position only: lighting changes nothing
    # chance: sizes 5/8 and 3/8 of the pixels in both maps; E[inter] = 25/8 and 9/8 pixel rows,
    # E[union] = 10 − 25/8 and 6 − 9/8 → IoU 5/11 and 3/13
    chance = 100 * (5 / 11 + 3 / 13) / 2
    assert figures["flip_stability_chance"] == pytest.approx(chance)
    assert figures["flip_stability_corrected"] == pytest.approx(100 * (12.5 - chance) / (100 - chance))
    assert figures["photometric_stability_corrected"] == pytest.approx(100.0)
    assert figures["cluster_entropy"] == pytest.approx(-(5 / 8 * math.log(5 / 8) + 3 / 8 * math.log(3 / 8)) / math.log(2))
    assert figures["empty_clusters"] == 0


def test_flip_of_a_colour_predictor_is_exact_and_the_photometric_view_is_as_computed_by_hand() -> None:
    """Grey halves 0.2 | 0.8; cluster 1 where the value exceeds 0.75. By hand, the photometric
    change: × 0.8 → 0.16 | 0.64, contrast × 1.25 around the mean 0.40 → 0.10 | 0.70 (grey: the
    saturation change does nothing). The right half falls below 0.75: cluster 0 IoU 1/2,
    cluster 1 IoU 0 → 25 %."""
    rgb = torch.full((2, 3, 6, 8), 0.2)
    rgb[..., 4:] = 0.8
    predictor = Recording(_bright(0.75))
    out = label_free_evaluation({"colour": (predictor, 2)}, _loader(rgb), CPU)
    expected_view = torch.full((2, 3, 6, 8), 0.10)
    expected_view[..., 4:] = 0.70
    assert torch.allclose(denormalize(predictor.inputs[2]), expected_view, atol=1e-5)
    figures = out.figures["methods"]["colour"]
    assert figures["flip_stability"] == pytest.approx(100.0)  # a fixed function of colour: flip-equivariant
    assert figures["photometric_stability"] == pytest.approx(100 * (1 / 2 + 0) / 2)
    assert figures["cluster_entropy"] == pytest.approx(1.0) and figures["empty_clusters"] == 0


def test_photometric_change_of_a_coloured_pixel_by_hand() -> None:
    """One uniform colour (0.6, 0.4, 0.2), worked through the three steps with plain floats."""
    r, g, b = 0.6 * 0.8, 0.4 * 0.8, 0.2 * 0.8  # brightness × 0.8
    grey = 0.299 * r + 0.587 * g + 0.114 * b  # the image's mean grey (uniform image)
    r, g, b = ((v - grey) * 1.25 + grey for v in (r, g, b))  # contrast × 1.25 around it
    grey = 0.299 * r + 0.587 * g + 0.114 * b
    r, g, b = (grey + 0.6 * (v - grey) for v in (r, g, b))  # saturation × 0.6
    rgb = torch.tensor([0.6, 0.4, 0.2]).view(1, 3, 1, 1).expand(1, 3, 4, 4).contiguous()
    predictor = Recording(lambda images, size: torch.zeros(images.shape[0], *size, dtype=torch.long))
    label_free_evaluation({"one": (predictor, 1)}, _loader(rgb), CPU)
    view = denormalize(predictor.inputs[2])[0, :, 0, 0]
    assert view.tolist() == pytest.approx([r, g, b], abs=1e-5)


def _step_scene() -> torch.Tensor:
    """16 × 16 grey image, black on columns 0-7 and white on 8-15."""
    rgb = torch.zeros(1, 3, 16, 16)
    rgb[..., 8:] = 1.0
    return rgb


def test_edge_map_of_a_step_by_hand() -> None:
    """The Sobel response of the step is 4 on columns 7 and 8 and 0 elsewhere (2 of 16 columns,
    under the top 20 %: every non-zero response counts); one pixel around them: columns 6-9."""
    expected = torch.zeros(1, 16, 16, dtype=torch.bool)
    expected[..., 6:10] = True
    assert torch.equal(edge_map(normalize(_step_scene())), expected)


@pytest.mark.parametrize(("name", "maps", "precision"), [
    ("boundary on the edge", lambda m: m[..., 8:].fill_(1), 100.0),  # boundary pixels: column 7
    ("boundary off the edge", lambda m: m[..., 12:].fill_(1), 0.0),  # column 11, outside 6-9
    ("boundary across the edge", lambda m: m[:, 8:, :].fill_(1), 100 * 4 / 16),  # row 7; columns 6-9 on edges
])
def test_boundaries_on_a_known_edge_map(name, maps, precision) -> None:  # noqa: ANN001
    seg = torch.zeros(1, 16, 16, dtype=torch.long)
    maps(seg)
    out = label_free_evaluation({name: (lambda images, size: seg.clone(), 2)}, _loader(_step_scene()), CPU)
    figures = out.figures["methods"][name]
    assert figures["boundary_edge_precision"] == pytest.approx(precision)
    assert out.figures["boundary_edge_chance"] == pytest.approx(100 * 4 / 16)  # 4 edge columns of 16
    assert figures["boundary_edge_corrected"] == pytest.approx(100 * (precision - 25) / 75)


def _pair_counts(a: list[int], b: list[int]) -> tuple[int, int, int, int]:
    """Pairs of pixels together in both, only in a, only in b, in neither (by enumeration)."""
    both = only_a = only_b = neither = 0
    for i, j in itertools.combinations(range(len(a)), 2):
        same_a, same_b = a[i] == a[j], b[i] == b[j]
        both += same_a and same_b
        only_a += same_a and not same_b
        only_b += same_b and not same_a
        neither += not same_a and not same_b
    return both, only_a, only_b, neither


def test_agreement_by_pair_counting_and_by_probabilities() -> None:
    a = [0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2]
    b = [0, 0, 0, 1, 1, 1, 1, 1, 1, 0, 0, 0]
    both, only_a, only_b, neither = _pair_counts(a, b)
    pairs = both + only_a + only_b + neither
    expected = (both + only_a) * (both + only_b) / pairs
    ari = (both - expected) / (((both + only_a) + (both + only_b)) / 2 - expected)
    n = len(a)
    p_ab = {(x, y): sum(1 for u, v in zip(a, b) if (u, v) == (x, y)) / n for x in set(a) for y in set(b)}
    p_a = {x: a.count(x) / n for x in set(a)}
    p_b = {y: b.count(y) / n for y in set(b)}
    mi = sum(p * math.log(p / (p_a[x] * p_b[y])) for (x, y), p in p_ab.items() if p > 0)
    h = (-sum(p * math.log(p) for p in p_a.values()) - sum(p * math.log(p) for p in p_b.values())) / 2
    rgb = torch.rand(1, 3, 3, 4, generator=torch.Generator().manual_seed(1))
    out = label_free_evaluation({"a": (lambda im, s: torch.tensor(a).view(1, 3, 4), 3),
                                 "b": (lambda im, s: torch.tensor(b).view(1, 3, 4), 2)}, _loader(rgb), CPU)
    assert out.figures["agreement"]["ari"] == pytest.approx(ari)
    assert out.figures["agreement"]["nmi"] == pytest.approx(mi / h)
    table = np.zeros((3, 2))
    for u, v in zip(a, b):
        table[u, v] += 1
    assert agreement_scores(table) == pytest.approx({"nmi": mi / h, "ari": ari})


def test_balance_and_empty_clusters_by_hand() -> None:
    """K = 4; three quarters of the pixels in cluster 0, one quarter in cluster 2, none in 1 and 3."""
    seg = torch.zeros(1, 4, 4, dtype=torch.long)
    seg[:, 3, :] = 2
    out = label_free_evaluation({"m": (lambda im, s: seg.clone(), 4)}, _loader(torch.rand(1, 3, 4, 4)), CPU)
    figures = out.figures["methods"]["m"]
    assert figures["cluster_entropy"] == pytest.approx(-(0.75 * math.log(0.75) + 0.25 * math.log(0.25)) / math.log(4))
    assert figures["empty_clusters"] == 2


def test_pooled_figures_equal_the_meters_and_weights_repeat_images() -> None:
    """On all images once, the per-image counts pool to the meters' figures; an image counted twice
    gives the figures of a batch holding it twice."""
    g = torch.Generator().manual_seed(3)
    a, b = torch.randint(0, 3, (4, 6, 6), generator=g), torch.randint(0, 3, (4, 6, 6), generator=g)
    edges = torch.rand(4, 6, 6, generator=g) > 0.6
    counts = ImageCounts(3)
    counts.update(a[:2], b[:2], a[:2], edges[:2])
    counts.update(a[2:], b[2:], a[2:], edges[2:])
    stability, boundary = StabilityMeter(3), BoundaryMeter()
    stability.update(a, b)
    boundary.update(a, edges)
    pooled = pooled_figures(counts.arrays())
    assert pooled["flip_stability"][0] == pytest.approx(stability.result())
    assert pooled["photometric_stability"][0] == pytest.approx(100.0)
    assert pooled["boundary_edge_precision"][0] == pytest.approx(boundary.result()[0])
    assert pooled["boundary_edge_chance"][0] == pytest.approx(boundary.result()[1])
    twice = StabilityMeter(3)
    twice.update(torch.cat([a, a[1:2]]), torch.cat([b, b[1:2]]))
    weights = np.array([[1.0, 2.0, 1.0, 1.0], [0.0, 4.0, 0.0, 0.0]])
    resampled = pooled_figures(counts.arrays(), weights)["flip_stability"]
    only_second = StabilityMeter(3)
    only_second.update(a[1:2], b[1:2])
    assert resampled.tolist() == pytest.approx([twice.result(), only_second.result()])
