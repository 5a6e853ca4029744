"""Which images of a folder are held out of training, and the run folder's list of them.

A folder without ``val/`` sub-folder is split by ``data.holdout`` (the folder preset: 0.2): an
image is held out when the SHA-1 of its name (its path relative to the folder, without suffix),
read as a number in [0, 1), is below the fraction. The rule looks at each name alone, so:

* the split is the same on every run and every machine while the folder is unchanged;
* adding photos to a folder never moves a held-out photo into training, nor a training photo
  out of it — except in the two bounds below, which only small folders meet;
* about ``holdout`` of the photos are held out (the count varies like a coin toss per photo).

Bounds: at least :data:`MIN_HELD_OUT` photo is held out (the one whose hash is smallest, when
none falls below the fraction) and at least :data:`MIN_TRAIN` stay for training (those whose
hash is largest return to training), so a folder needs :data:`MIN_FOLDER_IMAGES` photos; fewer
is refused when training starts.

``held_out.txt`` in a run folder lists the held-out images (one path relative to ``data.root``
per line; lines starting with ``#`` are comments): :func:`write_held_out` at training start,
:func:`read_held_out` for the report and whoever wants to know what was never trained on.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path

from hpseg.io import atomic_write_text

__all__ = ["HELD_OUT_FILE", "MIN_FOLDER_IMAGES", "MIN_HELD_OUT", "MIN_TRAIN", "holdout_indices", "name_position",
           "read_held_out", "write_held_out"]

#: images a training run needs (positives are mined across the images of a batch of at least 2)
MIN_TRAIN = 2
#: images held out for evaluation when a folder is split by ``data.holdout``
MIN_HELD_OUT = 1
#: the fewest images a folder split by ``data.holdout`` can be trained and evaluated on
MIN_FOLDER_IMAGES = MIN_TRAIN + MIN_HELD_OUT
#: the list of held-out images in a run folder (and in its evaluation folder)
HELD_OUT_FILE = "held_out.txt"


def name_position(name: str) -> float:
    """The SHA-1 of ``name`` (UTF-8) as a number in [0, 1): where the name falls in the split."""
    return int.from_bytes(hashlib.sha1(name.encode("utf-8")).digest()[:8], "big") / 2.0**64


def holdout_indices(names: Sequence[str], fraction: float) -> tuple[list[int], list[int]]:
    """``(training, held-out)`` indices (ascending) of items called ``names``.

    Held out: the names whose :func:`name_position` is below ``fraction``, bounded to at least
    :data:`MIN_HELD_OUT` (smallest positions first) and at most ``len(names) − MIN_TRAIN``
    (largest positions return to training). ``fraction ≤ 0`` or fewer than
    :data:`MIN_FOLDER_IMAGES` names: nothing is held out.
    """
    n = len(names)
    if fraction <= 0 or n < MIN_FOLDER_IMAGES:
        return list(range(n)), []
    position = [name_position(name) for name in names]
    order = sorted(range(n), key=lambda i: (position[i], names[i]))
    below = sum(position[i] < fraction for i in range(n))
    k = min(max(MIN_HELD_OUT, below), n - MIN_TRAIN)
    held = set(order[:k])
    return [i for i in range(n) if i not in held], sorted(held)


def write_held_out(folder: Path, files: Sequence[str], *, root: str | Path, fraction: float) -> Path:
    """Write ``folder/held_out.txt``: the held-out ``files`` (paths relative to ``root``)."""
    header = (f"# {len(files)} image(s) of {root} held out of training (data.holdout={fraction:g}): the "
              "evaluation set; paths relative to that folder\n")
    path = folder / HELD_OUT_FILE
    atomic_write_text(path, header + "".join(f"{f}\n" for f in files))
    return path


def read_held_out(folder: str | Path) -> list[str] | None:
    """The held-out images listed in ``folder/held_out.txt`` (a run folder, or an evaluation
    folder: ``hpseg evaluate`` copies the list there) as paths relative to ``data.root``; None
    when there is no list (a run that held nothing out, or one trained before the list existed)."""
    path = Path(folder) / HELD_OUT_FILE
    if not path.is_file():
        return None
    lines = path.read_text(encoding="utf-8").splitlines()
    return [line for line in lines if line.strip() and not line.startswith("#")]
