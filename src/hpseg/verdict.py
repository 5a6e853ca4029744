"""The label-free verdict in words: is one method's figure clearly above or below another's?

The held-out images are a sample of the user's photos; a figure pooled over eight images could
differ between two methods by luck. The uncertainty comes from a **paired bootstrap over
images** (README, "Your own images"): ``RESAMPLES`` resamples of the ``N`` held-out images with
replacement (a seeded generator, so the verdict is the same on every evaluation), the same
resample for both methods; on each, every figure is pooled exactly as the headline figure is
(:func:`hpseg.label_free.pooled_figures`) and the two methods' values are subtracted. The 95 %
interval is the 2.5th and 97.5th percentile of these differences. A difference is **clear**
when its interval excludes 0; otherwise the sentence says "no clear difference".

**Too few images**: below :data:`MIN_IMAGES` (6) held-out images no verdict is given. Even if
one method won on every image, with 5 images a sign test (two-sided) leaves a 6.25 % chance of
that under no difference, so no data could support a verdict at the 95 % level, and percentile
intervals of so few images are too narrow.

Everything here is a pure function of per-image counts (:class:`hpseg.label_free.ImageCounts`).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from hpseg.label_free import pooled_figures

__all__ = [
    "DIRECTIONAL",
    "INTERVAL_FIGURES",
    "LEVEL",
    "MIN_IMAGES",
    "RESAMPLES",
    "SEED",
    "bootstrap_weights",
    "compare_methods",
    "figure_intervals",
    "overall_sentence",
]

#: bootstrap resamples of the held-out images
RESAMPLES = 2000
#: the bootstrap's seed (fixed: the same evaluation gives the same verdict)
SEED = 0
#: the intervals' coverage
LEVEL = 0.95
#: fewest held-out images for a verdict (see the module docstring)
MIN_IMAGES = 6
#: figures with a better direction (higher is better); they make the overall verdict
DIRECTIONAL = ("flip_stability", "photometric_stability", "boundary_edge_precision")
#: figures a method's own interval is given for (what the K sweep compares)
INTERVAL_FIGURES = ("flip_stability", "photometric_stability", "boundary_edge_precision", "flip_stability_corrected",
                    "photometric_stability_corrected", "stability_corrected", "boundary_edge_corrected")

#: figure → (title, words when the first method is higher, when lower, digits)
_WORDING = {
    "flip_stability": ("flip stability", "is more stable under flips than", "is less stable under flips than", 1),
    "photometric_stability": ("photometric stability", "is more stable under a change of lighting than",
                              "is less stable under a change of lighting than", 1),
    "boundary_edge_precision": ("boundaries on image edges", "puts more of its boundaries on image edges than",
                                "puts fewer of its boundaries on image edges than", 1),
    "cluster_entropy": ("cluster balance", "has more evenly sized clusters than", "has less evenly sized clusters than",
                        3),
}


def bootstrap_weights(n: int, resamples: int = RESAMPLES, seed: int = SEED) -> np.ndarray:
    """``(resamples, n)`` multiplicities: row ``r`` counts how often each of ``n`` images was
    drawn in resample ``r`` (``n`` draws with replacement; every row sums to ``n``)."""
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, n, size=(resamples, n)) if n else np.zeros((resamples, 0), dtype=np.int64)
    weights = np.zeros((resamples, n))
    np.add.at(weights, (np.repeat(np.arange(resamples), n), draws.reshape(-1)), 1.0)
    return weights


def _interval(values: np.ndarray, level: float = LEVEL) -> tuple[float, float] | None:
    """Percentile interval of the finite ``values`` (None when fewer than 95 % are finite)."""
    finite = values[np.isfinite(values)]
    if finite.size == 0 or finite.size < 0.95 * values.size:
        return None
    tail = 100 * (1 - level) / 2
    low, high = np.percentile(finite, [tail, 100 - tail])
    return float(low), float(high)


def figure_intervals(counts: dict[str, np.ndarray], weights: np.ndarray) -> dict[str, list[float]]:
    """One method's 95 % bootstrap interval ``[low, high]`` of each of :data:`INTERVAL_FIGURES`,
    from its per-image ``counts`` (:meth:`~hpseg.label_free.ImageCounts.arrays`) and the
    resamples ``weights`` ``(R, N)`` (:func:`bootstrap_weights`)."""
    resampled = pooled_figures(counts, weights)
    out = {}
    for key in INTERVAL_FIGURES:
        interval = _interval(resampled[key])
        if interval is not None:
            out[key] = [interval[0], interval[1]]
    return out


def _signed(value: float, digits: int) -> str:
    return f"{value:+.{digits}f}"


def _figure_verdict(key: str, diff: float, interval: tuple[float, float] | None, values: tuple[float, float],
                    n: int, names: tuple[str, str]) -> dict[str, Any]:
    """The verdict of one figure: its difference, interval, call and sentence."""
    title, more, less, digits = _WORDING[key]
    a, b = names
    shown = f"{a} {values[0]:.{digits}f} vs {b} {values[1]:.{digits}f}"
    if n < MIN_IMAGES:
        return {"difference": diff, "low": None, "high": None, "call": "too few images",
                "sentence": f"too few held-out images to tell {title} apart ({shown}; {n} images, at least "
                            f"{MIN_IMAGES} needed)"}
    if interval is None:
        return {"difference": diff, "low": None, "high": None, "call": "undefined",
                "sentence": f"{title} cannot be told apart: undefined on many resamples of the images, e.g. "
                            f"without any segment boundary ({shown}; {n} images)"}
    low, high = interval
    detail = (f"({_signed(diff, digits)}, 95 % interval {_signed(low, digits)} … {_signed(high, digits)}, "
              f"{n} images)")
    if low > 0:
        call, sentence = "higher", f"{a} {more} {b} {detail}"
    elif high < 0:
        call, sentence = "lower", f"{a} {less} {b} {detail}"
    else:
        call, sentence = "no clear difference", f"no clear difference in {title} between {a} and {b} {detail}"
    return {"difference": diff, "low": low, "high": high, "call": call, "sentence": sentence}


def compare_methods(counts_a: dict[str, np.ndarray], counts_b: dict[str, np.ndarray], names: tuple[str, str], *,
                    resamples: int = RESAMPLES, seed: int = SEED) -> dict[str, Any]:
    """The verdict of method ``names[0]`` against ``names[1]`` on the same ``N`` images.

    Args:
        counts_a, counts_b: per-image counts of each method (:meth:`~hpseg.label_free.ImageCounts.arrays`),
            rows in the same image order.
        names: the two methods' names, as the sentences use them.

    Returns:
        ``{"methods", "n_images", "min_images", "method" (how the intervals were made),
        "figures": {figure: {"difference", "low", "high", "call", "sentence"}}, "overall"}``;
        ``difference`` is ``a − b`` of the pooled figures (points of % for the percentages),
        ``call`` one of "higher", "lower", "no clear difference", "too few images" (below
        :data:`MIN_IMAGES`), "undefined" (NaN on more than 5 % of the resamples).
    """
    n = len(counts_a["on_edge"])
    if len(counts_b["on_edge"]) != n:
        raise ValueError(f"the two methods were scored on {n} and {len(counts_b['on_edge'])} images")
    weights = bootstrap_weights(n, resamples, seed)
    observed_a, observed_b = pooled_figures(counts_a), pooled_figures(counts_b)
    resampled_a, resampled_b = pooled_figures(counts_a, weights), pooled_figures(counts_b, weights)
    figures = {}
    for key in _WORDING:
        va, vb = float(observed_a[key][0]), float(observed_b[key][0])
        if not (math.isfinite(va) and math.isfinite(vb)):
            continue
        interval = _interval(resampled_a[key] - resampled_b[key]) if n >= MIN_IMAGES else None
        figures[key] = _figure_verdict(key, va - vb, interval, (va, vb), n, names)
    return {"methods": list(names), "n_images": n, "min_images": MIN_IMAGES,
            "method": f"paired bootstrap over the {n} held-out images, {resamples} resamples (seed {seed}); "
                      f"{round(100 * LEVEL)} % percentile intervals of the differences",
            "figures": figures, "overall": overall_sentence(figures, n, names)}


def overall_sentence(figures: dict[str, dict[str, Any]], n: int, names: tuple[str, str]) -> str:
    """One sentence over the :data:`DIRECTIONAL` figures' calls (``figures`` as
    :func:`compare_methods` returns them)."""
    a, b = names
    calls = {key: figures[key]["call"] for key in DIRECTIONAL if key in figures}
    if n < MIN_IMAGES:
        return (f"Too few held-out images ({n}) to tell {a} from {b}: at least {MIN_IMAGES} are needed "
                "(add photos, or hold out more with data.holdout).")
    groups = {call: [_WORDING[key][0] for key, c in calls.items() if c == call] for call in ("higher", "lower")}
    unclear = [_WORDING[key][0] for key, c in calls.items() if c not in ("higher", "lower")]
    if not groups["higher"] and not groups["lower"]:
        return f"No clear difference between {a} and {b} on these {n} held-out images."
    parts = []
    if groups["higher"]:
        parts.append(f"{a} is better than {b} on {_join(groups['higher'])}")
    if groups["lower"]:
        parts.append(f"{'worse' if parts else f'{a} is worse than {b}'} on {_join(groups['lower'])}")
    text = ", ".join(parts)
    if unclear:
        text += f"; no clear difference on {_join(unclear)}"
    return f"{text} ({n} held-out images)."


def _join(items: list[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]
