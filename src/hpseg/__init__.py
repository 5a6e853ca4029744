"""hpseg: unsupervised semantic segmentation with Hidden Positives (CVPR 2023).

Public API (imported lazily, so ``import hpseg`` and the CLI start fast):

* :func:`load_model` — an :class:`HPModel` from an hpseg checkpoint or the authors' ``ckpt.pth``;
* :class:`HPModel` — frozen backbone + heads; ``scores`` (the one inference path), ``encode``,
  ``predict``;
* :class:`Segmenter` — images of any size to label maps (``hpseg.segmenter``).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

#: public name -> module that defines it (imported on first access)
_LAZY = {
    "HPModel": "hpseg.model",
    "load_model": "hpseg.checkpoint",
    "save_checkpoint": "hpseg.checkpoint",
    "build_backbone": "hpseg.backbones",
    "Segmenter": "hpseg.segmenter",
}

__all__ = ["__version__", *_LAZY]

if TYPE_CHECKING:  # pragma: no cover
    from hpseg.backbones import build_backbone as build_backbone
    from hpseg.checkpoint import load_model as load_model
    from hpseg.checkpoint import save_checkpoint as save_checkpoint
    from hpseg.model import HPModel as HPModel
    from hpseg.segmenter import Segmenter as Segmenter


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'hpseg' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
