"""hpseg: unsupervised semantic segmentation with Hidden Positives (CVPR 2023).

Public API (imported lazily, so ``import hpseg`` and the CLI start fast):

* :func:`load_model` — an :class:`HPModel` from an hpseg checkpoint or the authors' ``ckpt.pth``;
* :class:`HPModel` — frozen backbone + heads; ``encode`` / ``predict``;
* :class:`Segmenter` — image-level inference (``hpseg.predict``).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

#: public name -> module that defines it (imported on first access)
_LAZY = {
    "HPModel": "hpseg.model",
    "load_model": "hpseg.model",
    "save_checkpoint": "hpseg.model",
    "build_backbone": "hpseg.backbones",
    # --- Segmenter: defined in hpseg.predict (added separately); import stays lazy so that a
    # --- missing hpseg.predict never breaks `import hpseg`.
    "Segmenter": "hpseg.predict",
}

__all__ = ["__version__", *_LAZY]

if TYPE_CHECKING:  # pragma: no cover
    from hpseg.backbones import build_backbone as build_backbone
    from hpseg.model import HPModel as HPModel
    from hpseg.model import load_model as load_model
    from hpseg.model import save_checkpoint as save_checkpoint
    from hpseg.predict import Segmenter as Segmenter


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'hpseg' has no attribute {name!r}")
    try:
        value = getattr(importlib.import_module(module), name)
    except ModuleNotFoundError as exc:
        if exc.name != module:  # a real missing dependency: report it as is
            raise
        raise AttributeError(
            f"hpseg.{name} is unavailable: {module} is not installed in this version"
        ) from exc
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
