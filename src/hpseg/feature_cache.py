"""Cached frozen-backbone outputs of the (un-augmented) training images: ``train.cache_features``.

The backbone is frozen and the clean training view is deterministic (resize + centre crop), so
its ``feats (F, S, S)`` and ``attn_logits (H, 1+S², 1+S²)`` are the same in every epoch and
every pool renewal. :meth:`CachedFeatures.wrap` computes them once, stores them in
memory-mapped ``.npy`` files and returns a dataset whose items are the original items plus
``"feats"`` and ``"attn_logits"`` tensors; :func:`hpseg.train.backbone_outputs` and
:func:`hpseg.train.collect_pool` then skip the backbone for the clean view. The photometrically
augmented view (``img_aug``, random) is never cached: it still runs the backbone unless
``loss.alpha=0``.

Layout of ``cache_dir``::

    feats.npy       (N, F, S, S)          float16 (default) memory-mapped
    attn.npy        (N, H, 1+S², 1+S²)    float16, only with store_attention=True
    manifest.json   what the files hold; written last

Disk cost per image in float16: ``2·F·S²`` bytes of features plus ``2·H·(1+S²)²`` bytes of
attention. For ViT-S/8 at 224 px (F=384, H=6, S=28) that is 0.60 MB + 7.4 MB ≈ 8.0 MB per
image (≈ 0.4 TB for 50 000 images, ≈ 2 TB for COCO-Stuff's five-crop set); ViT-B/8 doubles
the features and the heads. ``store_attention=False`` caches features only (0.6 MB per
image): the clean view then still runs the backbone during training steps, but the reference
pools (built at the start and renewed every ``renew_interval`` iterations) no longer do.
The build refuses to start when the disk lacks the space.

Validity: the manifest records the dataset (length, type, ``repr``, a hash of the item names
and of the ``img`` tensors of three probe items), the backbone (name, architecture and a
SHA-256 fingerprint of its weights), the resolution, shapes and dtype. A later run reuses the
cache only if all of them match and both files have the recorded shapes; anything else is
rebuilt, never used silently. Files are written under temporary names, renamed when complete,
and the manifest is written last (and removed before a rebuild starts), so an interrupted
build is never mistaken for a complete one.

Distributed runs (torchrun): global rank 0 builds while the other ranks wait (on a barrier
with a long timeout: a build may take longer than the process group's default 30 minutes),
then every rank reads the same files. On multi-node runs whose ``cache_dir`` is node-local,
local rank 0 of each node that cannot see a valid cache builds its own copy.
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import json
import logging
import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset

from hpseg import distributed as dist
from hpseg.errors import HPSegError
from hpseg.io import atomic_write_text, write_error
from hpseg.preemption import QuietWorkersLoader

log = logging.getLogger(__name__)

__all__ = ["FORMAT", "FORMAT_VERSION", "CachedFeatures", "backbone_fingerprint", "cache_bytes_per_image"]

FORMAT = "hpseg-feature-cache"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
FEATS_FILE = "feats.npy"
ATTN_FILE = "attn.npy"
#: how long non-building ranks wait for the build (the default process-group timeout is 30 min)
WAIT_TIMEOUT = datetime.timedelta(hours=24)
_DTYPES = {torch.float16: np.float16, torch.float32: np.float32}
_N_PROBES = 3


# ------------------------------------------------------------------------------------------
# fingerprints
# ------------------------------------------------------------------------------------------


def backbone_fingerprint(backbone: nn.Module) -> str:
    """SHA-256 of a module's state (names, shapes, dtypes and bytes of every tensor), hex.

    About 0.3 s for ViT-B/8 (86 M parameters) on one core of the development machine.
    """
    h = hashlib.sha256()
    for name, tensor in sorted(backbone.state_dict().items()):
        t = tensor.detach().to("cpu").contiguous()
        h.update(f"{name}|{tuple(t.shape)}|{t.dtype}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _tensor_digest(t: torch.Tensor) -> str:
    t = t.detach().to("cpu").contiguous()
    return hashlib.sha256(t.reshape(-1).view(torch.uint8).numpy().tobytes()).hexdigest()[:32]


def _probe_indices(n: int) -> list[int]:
    return sorted({0, n // 2, n - 1})[:_N_PROBES]


def _dataset_description(dataset: Dataset[Any]) -> tuple[dict[str, Any], tuple[int, int]]:
    """What identifies the dataset's clean view, and its image size ``(H, W)``.

    Loads the probe items (3 images); the ``img`` tensors must be deterministic (the training
    transform is resize + centre crop, only ``img_aug`` is random).
    """
    n = len(dataset)  # type: ignore[arg-type]
    if n < 1:
        raise HPSegError("cannot cache features of an empty dataset: check data.root and the split")
    probes: dict[str, str] = {}
    size: tuple[int, int] | None = None
    for i in _probe_indices(n):
        item = dataset[i]
        if not isinstance(item, dict) or "img" not in item:
            raise HPSegError("feature caching needs dataset items that are dicts with an 'img' tensor")
        img = item["img"]
        if size is None:
            size = (int(img.shape[-2]), int(img.shape[-1]))
        probes[str(i)] = _tensor_digest(img)
    assert size is not None
    names_hash = None
    name_fn = getattr(dataset, "name", None)
    if callable(name_fn):
        h = hashlib.sha256()
        try:
            for i in range(n):
                h.update(str(name_fn(i)).encode() + b"\0")
            names_hash = h.hexdigest()[:32]
        except Exception:  # noqa: BLE001 - a dataset's optional naming hook: the probes still apply
            names_hash = None
    description = {
        "length": n,
        "type": f"{type(dataset).__module__}.{type(dataset).__qualname__}",
        "repr": repr(dataset) if type(dataset).__repr__ is not object.__repr__ else None,
        "names_sha256": names_hash,
        "probe_img_sha256": probes,
    }
    return description, size


def cache_bytes_per_image(
    embed_dim: int,
    num_heads: int,
    grid: tuple[int, int],
    dtype: torch.dtype = torch.float16,
    store_attention: bool = True,
) -> int:
    """Bytes one image takes in the cache: ``F·S²`` feature values (+ ``H·(1+S²)²`` attention)."""
    item = torch.empty((), dtype=dtype).element_size()
    s2 = grid[0] * grid[1]
    return item * (embed_dim * s2 + (num_heads * (1 + s2) ** 2 if store_attention else 0))


# ------------------------------------------------------------------------------------------
# the dataset
# ------------------------------------------------------------------------------------------


class CachedFeatures(Dataset[dict[str, Any]]):
    """A dataset whose items are ``dataset[i]`` plus cached ``"feats"`` ``(F, S, S)`` and (with
    attention stored) ``"attn_logits"`` ``(H, 1+S², 1+S²)`` tensors, in the cache's dtype.

    Build it with :meth:`wrap`. Memory maps are opened lazily in each process (DataLoader
    workers included) and are not pickled. Other attributes (``class_names``, ``n_classes``,
    …) are those of the wrapped dataset.
    """

    def __init__(
        self, dataset: Dataset[Any], cache_dir: str | os.PathLike[str], manifest: dict[str, Any]
    ) -> None:
        self.dataset = dataset
        self.cache_dir = Path(cache_dir)
        self.manifest = manifest
        self._feats: np.ndarray | None = None
        self._attn: np.ndarray | None = None

    # -- building / reusing -------------------------------------------------------------------
    @classmethod
    def wrap(
        cls,
        dataset: Dataset[Any],
        backbone: nn.Module,
        cache_dir: str | os.PathLike[str],
        device: torch.device | str,
        *,
        batch_size: int = 32,
        dtype: torch.dtype = torch.float16,
        store_attention: bool = True,
        num_workers: int = 0,
    ) -> CachedFeatures:
        """``dataset`` with its frozen-backbone outputs cached in ``cache_dir`` (built if needed).

        Args:
            dataset: training dataset of dict items with a deterministic ``"img"`` ``(3, H, W)``.
            backbone: the frozen :class:`~hpseg.backbones.Backbone` (``forward(images) ->
                (feats, attn_logits)``); moved to ``device`` for the build, then back.
            cache_dir: folder of the cache (created); a valid cache there is reused.
            device: where the build runs.
            batch_size: images per backbone forward during the build.
            dtype: ``torch.float16`` (default; halves the disk cost) or ``torch.float32``.
            store_attention: also cache ``attn_logits`` (see the module docstring for the cost).
            num_workers: DataLoader workers reading images during the build.

        Returns:
            The wrapping dataset.

        Raises:
            HPSegError: unsupported dtype, not enough disk space, values that overflow float16,
                or (distributed) a cache that some rank cannot see after the build.
        """
        if dtype not in _DTYPES:
            raise HPSegError(
                f"feature cache dtype {dtype} is unsupported: use torch.float16 or torch.float32"
            )
        cache_dir = Path(cache_dir)
        device = torch.device(device)
        expected = _expected_manifest(dataset, backbone, dtype, store_attention)

        def build_if_needed() -> None:
            if _load_valid_manifest(cache_dir, expected) is None:
                _build(
                    dataset,
                    backbone,
                    cache_dir,
                    device,
                    expected,
                    batch_size=batch_size,
                    num_workers=num_workers,
                )

        if not dist.is_distributed():
            build_if_needed()
        else:
            # the waiting group is made first (making it is itself a collective, under the default
            # timeout); its barriers may then wait for as long as the build takes
            with _long_wait_group() as group:
                if dist.is_main():
                    build_if_needed()
                torch.distributed.barrier(group=group)
                # node-local cache folders on multi-node runs: one build per node
                if not dist.is_main() and dist.local_rank() == 0:
                    build_if_needed()
                torch.distributed.barrier(group=group)
        manifest = _load_valid_manifest(cache_dir, expected)
        if manifest is None:
            raise HPSegError(
                f"rank {dist.rank()} finds no valid feature cache in {cache_dir} after rank 0 built it: "
                "put train.out_dir on a filesystem every process can read, or set train.cache_features=false"
            )
        log.info(
            "feature cache %s: %d images, feats %s, attention %s",
            cache_dir,
            manifest["length"],
            manifest["feats_shape"],
            manifest["attn_shape"],
        )
        return cls(dataset, cache_dir, manifest)

    # -- dataset protocol ---------------------------------------------------------------------
    def _maps(self) -> tuple[np.ndarray, np.ndarray | None]:
        if self._feats is None:
            self._feats = np.load(self.cache_dir / FEATS_FILE, mmap_mode="r")
            if self.manifest["attn_shape"] is not None:
                self._attn = np.load(self.cache_dir / ATTN_FILE, mmap_mode="r")
        return self._feats, self._attn

    def __len__(self) -> int:
        return int(self.manifest["length"])

    def __getitem__(self, index: int) -> dict[str, Any]:
        item = dict(self.dataset[index])
        feats, attn = self._maps()
        i = int(index)
        item["feats"] = torch.from_numpy(np.array(feats[i]))
        if attn is not None:
            item["attn_logits"] = torch.from_numpy(np.array(attn[i]))
        return item

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_feats"] = state["_attn"] = None  # reopened lazily; never pickle the arrays
        return state

    def __getattr__(self, name: str) -> Any:
        # only called for attributes not found normally: delegate to the wrapped dataset
        if name.startswith("__") or name in ("dataset", "_feats", "_attn", "manifest", "cache_dir"):
            raise AttributeError(name)
        return getattr(self.dataset, name)

    def __repr__(self) -> str:
        return f"CachedFeatures({self.dataset!r}, cache_dir={str(self.cache_dir)!r})"


# ------------------------------------------------------------------------------------------
# manifest and build
# ------------------------------------------------------------------------------------------


def _expected_manifest(
    dataset: Dataset[Any], backbone: nn.Module, dtype: torch.dtype, store_attention: bool
) -> dict[str, Any]:
    description, (h_img, w_img) = _dataset_description(dataset)
    bb: Any = backbone  # a Backbone: patch_size, embed_dim, num_heads, name, arch
    patch = int(bb.patch_size)
    if h_img % patch or w_img % patch:
        raise HPSegError(f"image size {h_img}×{w_img} is not a multiple of the patch size {patch}")
    grid = (h_img // patch, w_img // patch)
    embed_dim, heads = int(bb.embed_dim), int(bb.num_heads)
    n, tokens = description["length"], 1 + grid[0] * grid[1]
    arch = getattr(backbone, "arch", None)
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "length": n,
        "resolution": [h_img, w_img],
        "grid": list(grid),
        "dtype": str(dtype).replace("torch.", ""),
        "feats_shape": [n, embed_dim, grid[0], grid[1]],
        "attn_shape": [n, heads, tokens, tokens] if store_attention else None,
        "backbone": str(getattr(backbone, "name", type(backbone).__name__)),
        "backbone_arch": repr(arch) if arch is not None else None,
        "backbone_sha256": backbone_fingerprint(backbone),
        "dataset": description,
    }


def _load_valid_manifest(cache_dir: Path, expected: dict[str, Any]) -> dict[str, Any] | None:
    """The stored manifest when it matches ``expected`` and the files have its shapes, else None."""
    path = cache_dir / MANIFEST
    if not path.is_file():
        return None
    try:
        stored = json.loads(path.read_text())
    except (OSError, ValueError):
        log.warning("feature cache manifest %s is unreadable: rebuilding", path)
        return None
    if not isinstance(stored, dict) or not stored.get("complete"):
        return None
    changed = sorted(k for k in expected if stored.get(k) != expected[k])
    if changed:
        log.info("feature cache in %s is stale (%s differ): rebuilding", cache_dir, ", ".join(changed))
        return None
    for name, key in ((FEATS_FILE, "feats_shape"), (ATTN_FILE, "attn_shape")):
        if expected[key] is None:
            continue
        try:
            arr = np.load(cache_dir / name, mmap_mode="r")
        except (OSError, ValueError):
            log.warning("feature cache file %s is missing or damaged: rebuilding", cache_dir / name)
            return None
        if list(arr.shape) != expected[key] or arr.dtype != np.dtype(expected["dtype"]):
            log.warning(
                "feature cache file %s has shape %s %s: rebuilding", cache_dir / name, arr.shape, arr.dtype
            )
            return None
        del arr
    return stored


def _remove(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        path.unlink()


def _build(
    dataset: Dataset[Any],
    backbone: nn.Module,
    cache_dir: Path,
    device: torch.device,
    manifest: dict[str, Any],
    *,
    batch_size: int,
    num_workers: int,
) -> None:
    """Compute and store the backbone outputs of every image of ``dataset`` (see the module doc)."""
    cache_dir.mkdir(parents=True, exist_ok=True)
    _remove(cache_dir / MANIFEST)  # from here on the folder holds no valid cache until the end
    for stale in cache_dir.glob(".*.tmp.npy"):  # leftovers of interrupted builds
        _remove(stale)
    np_dtype = np.dtype(manifest["dtype"])
    feats_shape, attn_shape = manifest["feats_shape"], manifest["attn_shape"]
    need = int(np.prod(feats_shape)) * np_dtype.itemsize
    if attn_shape is not None:
        need += int(np.prod(attn_shape)) * np_dtype.itemsize
    free = shutil.disk_usage(cache_dir).free
    old = sum((cache_dir / f).stat().st_size for f in (FEATS_FILE, ATTN_FILE) if (cache_dir / f).is_file())
    if need > free + old:
        raise HPSegError(
            f"the feature cache needs {need / 2**30:.1f} GiB but {cache_dir} has {free / 2**30:.1f} GiB free: "
            "free space, move train.out_dir, or set train.cache_features=false"
        )
    log.info(
        "building the feature cache in %s: %d images, %.2f GiB", cache_dir, manifest["length"], need / 2**30
    )

    token = uuid.uuid4().hex[:8]
    tmp_feats = cache_dir / f".{FEATS_FILE}.{token}.tmp.npy"
    tmp_attn = cache_dir / f".{ATTN_FILE}.{token}.tmp.npy"
    limit = float(np.finfo(np_dtype).max)
    try:
        feats_mm = np.lib.format.open_memmap(tmp_feats, mode="w+", dtype=np_dtype, shape=tuple(feats_shape))
        attn_mm = (
            np.lib.format.open_memmap(tmp_attn, mode="w+", dtype=np_dtype, shape=tuple(attn_shape))
            if attn_shape is not None
            else None
        )
        # its workers leave stop signals to the main process, like the training loaders'
        loader = QuietWorkersLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers)
        start = 0
        with _on_device(backbone, device), torch.no_grad():
            for batch in loader:
                images = batch["img"].to(device)
                out = backbone(images, with_attention=attn_mm is not None)
                feats, attn = out[0], out[1]
                stop = start + images.shape[0]
                for arr, value, what in ((feats_mm, feats, "feats"), (attn_mm, attn, "attn_logits")):
                    if arr is None:
                        continue
                    value = value.float()
                    peak = float(value.abs().max())
                    if not np.isfinite(peak) or peak > limit:
                        raise HPSegError(
                            f"backbone {what} reach {peak:.3g}, beyond {np_dtype.name}: build the cache "
                            "with dtype=torch.float32"
                        )
                    arr[start:stop] = value.to("cpu").numpy().astype(np_dtype)
                start = stop
        if start != manifest["length"]:
            raise RuntimeError(f"the dataset yielded {start} images, expected {manifest['length']}")
        for arr in (feats_mm, attn_mm):
            if arr is not None:
                arr.flush()
        del feats_mm, attn_mm
        for tmp in (tmp_feats, tmp_attn):
            if tmp.is_file():
                with open(tmp, "rb+") as fh:
                    os.fsync(fh.fileno())
        os.replace(tmp_feats, cache_dir / FEATS_FILE)
        if attn_shape is not None:
            os.replace(tmp_attn, cache_dir / ATTN_FILE)
        else:
            _remove(cache_dir / ATTN_FILE)
    except BaseException as exc:
        _remove(tmp_feats)
        _remove(tmp_attn)
        error = write_error(cache_dir / FEATS_FILE, exc)  # a full disk, a quota, permissions: one line
        if error is not None:
            raise error from exc
        raise
    done = {**manifest, "complete": True, "created": datetime.datetime.now(datetime.timezone.utc).isoformat()}
    atomic_write_text(cache_dir / MANIFEST, json.dumps(done, indent=2))
    log.info("feature cache complete: %s", cache_dir)


@contextlib.contextmanager
def _on_device(module: nn.Module, device: torch.device) -> Iterator[None]:
    """Run ``module`` on ``device`` in eval mode, restoring its device and mode afterwards."""
    try:
        before = next(module.parameters()).device
    except StopIteration:
        before = device
    was_training = module.training
    module.to(device).eval()
    try:
        yield
    finally:
        module.to(before).train(was_training)


@contextlib.contextmanager
def _long_wait_group() -> Iterator[Any]:
    """A gloo process group with a long timeout for waiting on the build (None: the default group)."""
    group = None
    if torch.distributed.is_gloo_available():
        group = torch.distributed.new_group(backend="gloo", timeout=WAIT_TIMEOUT)
    try:
        yield group
    finally:
        if group is not None:
            torch.distributed.destroy_process_group(group)
