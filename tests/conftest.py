"""Shared pytest fixtures for hpseg tests."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def _find_golden() -> Path:
    """``$HPSEG_GOLDEN`` if set, else ``tests/golden`` inside this repository (shipped with it)."""
    env = os.environ.get("HPSEG_GOLDEN")
    if env:
        return Path(env).expanduser().resolve()
    return Path(__file__).resolve().parent / "golden"


GOLDEN_DIR = _find_golden()

# Two cores on CI: keep each test process lean and deterministic.
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

# Without a GPU the fused loss's Triton kernels are tested in Triton's interpreter. Triton decides
# at its first import whether its own library (tl.sum, tl.max, …) is interpreted, and importing
# hpseg's training modules imports it (through torch._dynamo): the variable must be set now,
# before any test module is collected. Importing torch and asking for CUDA does not import triton.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(scope="session")
def golden_dir() -> Path:
    """Directory of golden files recorded from the authors' code (``tests/golden/README.md``).

    The recordings ship with the repository: a missing folder is a failure, never a skip.
    """
    if not GOLDEN_DIR.is_dir():
        pytest.fail(
            f"golden data folder {GOLDEN_DIR} does not exist: it ships in tests/golden; "
            "unset HPSEG_GOLDEN or point it at a copy of that folder"
        )
    return GOLDEN_DIR


@pytest.fixture(scope="session")
def golden_file(golden_dir: Path):
    """Path of one golden file by name; a missing file fails the test."""

    def _path(name: str) -> Path:
        path = golden_dir / name
        if not path.is_file():
            pytest.fail(f"golden file {name} not found in {golden_dir} (see tests/golden/README.md)")
        return path

    return _path


@pytest.fixture(scope="session")
def load_golden(golden_file):
    """Load one golden file by name: plain containers of tensors and numbers (weights_only)."""

    def _load(name: str) -> dict:
        return torch.load(golden_file(name), map_location="cpu", weights_only=True)

    return _load


@pytest.fixture(scope="session")
def tiny_backbone_file(tmp_path_factory) -> Path:
    """A tiny ViT in the official DINO release layout (plain state dict): width 64 (1 head),
    depth 1, patch 8, 4×4 position grid. Random weights, seeded; built once per session."""
    from functools import partial

    from timm.models.vision_transformer import VisionTransformer

    torch.manual_seed(0)
    vit = VisionTransformer(
        img_size=32, patch_size=8, embed_dim=64, depth=1, num_heads=1, mlp_ratio=2, qkv_bias=True,
        num_classes=0, norm_layer=partial(torch.nn.LayerNorm, eps=1e-6),
    )
    path = tmp_path_factory.mktemp("weights") / "tiny_dino_vit.pth"
    torch.save(vit.state_dict(), path)
    return path
