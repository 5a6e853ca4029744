"""Shared pytest fixtures for hpseg tests."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def _find_golden() -> Path:
    """``$HPSEG_GOLDEN``, else ``../shared/golden`` beside this checkout, else beside the
    repository this checkout was cloned from (CI runs on a fresh clone in a temporary folder)."""
    if os.environ.get("HPSEG_GOLDEN"):
        return Path(os.environ["HPSEG_GOLDEN"])
    here = ROOT.parent / "shared" / "golden"
    if here.is_dir():
        return here
    try:
        origin = subprocess.run(
            ["git", "-C", str(ROOT), "config", "--get", "remote.origin.url"],
            capture_output=True, text=True, timeout=10, check=False,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        origin = ""
    if origin and "://" not in origin and Path(origin).is_dir():
        cloned_from = Path(origin).resolve().parent / "shared" / "golden"
        if cloned_from.is_dir():
            return cloned_from
    return here


GOLDEN_DIR = _find_golden()

# Two cores on CI: keep each test process lean and deterministic.
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(scope="session")
def golden_dir() -> Path:
    """Directory of golden files recorded from the authors' code (skips when absent)."""
    if not GOLDEN_DIR.is_dir():
        pytest.skip(f"golden data not found at {GOLDEN_DIR}; set HPSEG_GOLDEN to its folder")
    return GOLDEN_DIR


@pytest.fixture(scope="session")
def load_golden(golden_dir: Path):
    """Load one golden file by name (trusted local data recorded by the project)."""

    def _load(name: str) -> dict:
        path = golden_dir / name
        if not path.is_file():
            pytest.skip(f"golden file {name} not found in {golden_dir}")
        return torch.load(path, map_location="cpu", weights_only=False)

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
