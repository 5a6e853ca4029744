"""Backbone weights: official downloads, local files in every layout hpseg reads, and the
architecture a DINO state dict describes.

Layouts read by :func:`normalize_state_dict`: plain DINO/timm state dicts, DINO training
checkpoints (``{"teacher": {"module.backbone.<key>": …}}``), ``{"model": …}`` /
``{"state_dict": …}`` wrappers, ``.safetensors`` files and the authors' HP ``ckpt.pth``
(``net_model_state_dict["model.<key>"]``). Files are read with ``torch.load(weights_only=True)``.
Offline, every download fails fast with the file to fetch and the folder to put it in.
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import logging
import math
import os
import re
import socket
import urllib.error
import urllib.parse
from collections.abc import Mapping
from importlib import resources
from pathlib import Path
from typing import Any

import torch

from hpseg.backbones.registry import (
    DEMO_ASSET,
    DINO_BASE_URL,
    DINOV3_REPO,
    Registered,
    TimmRelease,
    heads_for_width,
)
from hpseg.backbones.vit import BackboneArch
from hpseg.errors import HPSegError
from hpseg.io import safe_torch_load

log = logging.getLogger(__name__)

__all__ = [
    "cached_meta_file",
    "check_timm_weights_reachable",
    "demo_weights",
    "download_dino",
    "infer_dino_arch",
    "load_weights_file",
    "normalize_state_dict",
]


def _strip_prefixes(sd: Mapping[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in sd.items():
        k = key
        changed = True
        while changed:
            changed = False
            for prefix in ("module.", "backbone.", "_orig_mod."):
                if k.startswith(prefix):
                    k = k[len(prefix) :]
                    changed = True
        out[k] = value
    return out


def normalize_state_dict(obj: Any) -> dict[str, torch.Tensor]:
    """A ViT state dict in DINO/timm key naming from any of the supported layouts.

    Accepts a plain state dict, a DINO training checkpoint (``{"teacher": {"module.backbone.…"}}``),
    ``{"model": …}`` / ``{"state_dict": …}`` wrappers and the authors' HP ``ckpt.pth``
    (``net_model_state_dict["model.…"]``). ``module.``/``backbone.`` prefixes and DINO's projection
    head (``head.*``) are removed.
    """
    if not isinstance(obj, Mapping):
        raise HPSegError(f"expected a state dict (a mapping of names to tensors), got {type(obj).__name__}")
    if isinstance(obj.get("net_model_state_dict"), Mapping):  # the authors' HP checkpoint
        net = obj["net_model_state_dict"]
        obj = {k[len("model.") :]: v for k, v in net.items() if k.startswith("model.")}
    else:
        for wrapper in ("teacher", "model", "state_dict"):
            inner = obj.get(wrapper)
            if isinstance(inner, Mapping):
                obj = inner
                break
    sd = _strip_prefixes(obj)
    return {k: v for k, v in sd.items() if isinstance(v, torch.Tensor) and not k.startswith("head.")}


def _allow_namespace() -> contextlib.AbstractContextManager[Any]:
    """Allow ``argparse.Namespace`` (the ``args`` of DINO training checkpoints) in weights_only loads."""
    safe_globals = getattr(torch.serialization, "safe_globals", None)  # torch >= 2.5
    return safe_globals([argparse.Namespace]) if safe_globals is not None else contextlib.nullcontext()


def load_weights_file(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a weights file (``.pth``/``.pt`` via ``torch.load(weights_only=True)``, or
    ``.safetensors``) and :func:`normalize_state_dict` it."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise HPSegError(f"backbone weights file {path} does not exist: check the path given as weights=")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return normalize_state_dict(load_file(str(path), device="cpu"))
        except Exception as exc:  # safetensors raises its own error types
            raise HPSegError(
                f"cannot read {path} as safetensors ({exc}): re-download or re-export it"
            ) from exc
    with _allow_namespace():
        obj = safe_torch_load(path, expected="backbone weights (a state dict or a DINO checkpoint)",
                              fix="re-download the file, or pass a state dict saved by torch.save as weights=")
    return normalize_state_dict(obj)


def _reachable(host: str, timeout: float = 3.0) -> bool:
    """Whether ``host:443`` accepts a connection within ``timeout`` seconds (offline check)."""
    if os.environ.get("HF_HUB_OFFLINE") == "1" and "huggingface" in host:
        return False
    try:
        with socket.create_connection((host, 443), timeout=timeout):
            return True
    except OSError:
        return False


def download_dino(name: str, reg: Registered) -> dict[str, torch.Tensor]:
    """The official DINO weights of ``name``: the torch hub cache first, then a download.

    Raises:
        HPSegError: offline (or the download fails) — naming the file, its URL and the folder
            to put it in.
    """
    assert reg.url_path is not None and reg.file_name is not None
    url = DINO_BASE_URL + reg.url_path
    ckpt_dir = Path(torch.hub.get_dir()) / "checkpoints"
    cached = ckpt_dir / reg.file_name
    if cached.is_file():
        return load_weights_file(cached)
    hint = f"download {url} elsewhere and put it in {ckpt_dir}/, or pass weights=PATH"
    if not _reachable(urllib.parse.urlsplit(url).hostname or ""):
        raise HPSegError(f"the {name} weights {reg.file_name} are not cached and this machine is offline: {hint}")
    try:
        log.info("downloading %s weights from %s", name, url)
        sd = torch.hub.load_state_dict_from_url(url, map_location="cpu", weights_only=True)
    except (OSError, urllib.error.URLError, http.client.HTTPException) as exc:
        raise HPSegError(f"cannot download the {name} weights {reg.file_name} ({exc}): {hint}") from exc
    return normalize_state_dict(sd)


def cached_meta_file(release: TimmRelease) -> Path | None:
    """Meta's official weights file of ``release`` in the torch hub cache
    (``<hub>/checkpoints/<meta_file>-<hash>.pth``), or None."""
    folder = Path(torch.hub.get_dir()) / "checkpoints"
    found = sorted(folder.glob(f"{release.meta_file}*.pth")) if folder.is_dir() else []
    return found[0] if found else None


def check_timm_weights_reachable(name: str, release: TimmRelease | None = None, label: str | None = None) -> None:
    """Fail fast when timm's pretrained weights of ``name`` are neither cached nor downloadable.

    timm fetches them from the Hugging Face hub and, offline, spends a long time in retries
    before failing; this check answers in seconds with the file to fetch and where to put it
    (for a short name ``label`` and its ``release`` also Meta's official file and the folder it is
    looked for in).
    """
    import timm

    cfg = timm.models.get_pretrained_cfg(name)
    repo = getattr(cfg, "hf_hub_id", None) if cfg is not None else None
    if not repo:
        return  # not a hub model (timm will use its URL)
    repo = repo.split("@")[0]
    try:
        from huggingface_hub import constants, try_to_load_from_cache
    except ImportError:  # pragma: no cover - timm depends on huggingface_hub
        return
    for file_name in ("model.safetensors", "pytorch_model.bin", "open_clip_pytorch_model.bin"):
        if isinstance(try_to_load_from_cache(repo, file_name), str):
            return
    if _reachable("huggingface.co"):
        return
    url = f"https://huggingface.co/{repo}/resolve/main/model.safetensors"
    if release is not None:
        hub = Path(torch.hub.get_dir()) / "checkpoints"
        raise HPSegError(
            f"the weights of {label or name} are not cached and this machine cannot reach huggingface.co: put Meta's "
            f"{release.meta_file}-*.pth ({DINOV3_REPO}) in {hub}/, or download {url} and pass weights=PATH"
        )
    folder = Path(constants.HF_HUB_CACHE) / f"models--{repo.replace('/', '--')}"
    raise HPSegError(
        f"the timm weights of {name} are not cached and this machine cannot reach huggingface.co: "
        f"download {url} and pass weights=PATH (or copy a connected machine's {folder} here)"
    )


def demo_weights() -> dict[str, torch.Tensor]:
    res = resources.files("hpseg") / "assets" / DEMO_ASSET
    if not res.is_file():
        raise HPSegError(
            f"the demo backbone weights hpseg/assets/{DEMO_ASSET} are missing: "
            "create them with `python scripts/pretrain_demo_backbone.py`"
        )
    return load_weights_file(Path(str(res)))


# ------------------------------------------------------------------------------------------
# building
# ------------------------------------------------------------------------------------------


def infer_dino_arch(
    sd: Mapping[str, torch.Tensor], name: str = "dino_custom", num_heads: int | None = None
) -> BackboneArch:
    """A DINO-style ViT architecture read from its state dict (DINO/timm key naming).

    Embed dim from ``cls_token``/``pos_embed``, depth from the block indices, patch size from
    ``patch_embed.proj.weight``, position grid from ``pos_embed`` (CLS + square grid), heads
    from ``num_heads`` or the width (6 for 384, 12 for 768, …, else width/64).
    """
    required = ("pos_embed", "cls_token", "patch_embed.proj.weight")
    missing = [k for k in required if k not in sd]
    if missing:
        raise HPSegError(
            f"the state dict is not a DINO ViT (missing {', '.join(missing)}): "
            "pass a DINO checkpoint or a timm model name"
        )
    if "reg_token" in sd:
        raise HPSegError("the state dict has register tokens: build it with its timm model name instead")
    embed_dim = int(sd["cls_token"].shape[-1])
    blocks = {int(m.group(1)) for k in sd if (m := re.match(r"blocks\.(\d+)\.", k))}
    if not blocks:
        raise HPSegError("the state dict has no transformer blocks (blocks.N.*): is it a ViT checkpoint?")
    depth = max(blocks) + 1
    pw = sd["patch_embed.proj.weight"]
    if pw.ndim != 4 or pw.shape[-1] != pw.shape[-2]:
        raise HPSegError(f"unsupported patch embedding weight of shape {tuple(pw.shape)}")
    n = int(sd["pos_embed"].shape[1]) - 1
    side = math.isqrt(n)
    if side * side != n:
        raise HPSegError(f"pos_embed holds {n} patch positions, not a square grid: use a timm model name")
    if num_heads is None:
        num_heads = heads_for_width(embed_dim)
        if num_heads is None:
            raise HPSegError(f"cannot infer the number of heads of a {embed_dim}-wide ViT: pass num_heads=")
    fc1 = sd.get("blocks.0.mlp.fc1.weight")
    mlp_ratio = float(fc1.shape[0] / embed_dim) if fc1 is not None else 4.0
    return BackboneArch(
        name=name,
        patch_size=int(pw.shape[-1]),
        embed_dim=embed_dim,
        depth=depth,
        num_heads=int(num_heads),
        pos_grid=(side, side),
        num_registers=0,
        dino_family=True,
        mlp_ratio=mlp_ratio,
        qkv_bias="blocks.0.attn.qkv.bias" in sd,
        layer_scale="blocks.0.ls1.gamma" in sd,
    )
