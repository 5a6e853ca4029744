"""Pretrain ``hpseg_demo_vit``: a tiny ViT taught by DINO-style self-distillation on synthetic scenes.

The demo (``hpseg demo``) needs a backbone whose patch features carry meaning, like DINO's do
on photographs, but it may not download anything. This script makes one on the CPU in about
ten minutes: a ViT (96 px, patch 8, width 192, depth 4, 3 heads) trained without labels by

* DINO's image-level self-distillation (student vs EMA teacher, centring + sharpening) between
  two augmented global views of a scene, and
* iBOT's masked patch distillation: the student sees ~30 % of its patch tokens masked and must
  predict the teacher's patch distribution there — a dense objective that makes patch features
  (what HP uses) informative.

Scenes come from the ``pretrain`` stream of :mod:`hpseg.data.synthetic`, disjoint from the
demo's train/val scenes, with all 8 texture classes. Labels are never read. Colour jitter and
grayscale are strong because colour carries no class information in these scenes.

Output: ``src/hpseg/assets/demo_vit.safetensors`` (teacher backbone, fp16, timm key names) and
``demo_vit.json`` (recipe, timing, machine, and a k-means probe against a random ViT and raw
colour). The defaults are exactly what produced the shipped weights::

    python scripts/pretrain_demo_backbone.py
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import time
from functools import partial
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from scipy.optimize import linear_sum_assignment
from timm.models.vision_transformer import VisionTransformer
from torch import nn
from torchvision.transforms import v2

from hpseg.data.synthetic import SyntheticScenes

ASSETS = Path(__file__).resolve().parents[1] / "src" / "hpseg" / "assets"
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def make_vit() -> VisionTransformer:
    """The fixed architecture of ``hpseg_demo_vit`` (see ``hpseg.backbones``)."""
    return VisionTransformer(
        img_size=96, patch_size=8, embed_dim=192, depth=4, num_heads=3, mlp_ratio=4, qkv_bias=True,
        num_classes=0, norm_layer=partial(nn.LayerNorm, eps=1e-6), dynamic_img_size=True,
    )


class Head(nn.Module):
    """DINO projection head: MLP → L2-normalised bottleneck → weight-normalised prototypes."""

    def __init__(self, dim: int, hidden: int = 384, bottleneck: int = 96, prototypes: int = 256) -> None:
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, hidden), nn.GELU(),
                                 nn.Linear(hidden, bottleneck))
        self.last = nn.utils.parametrizations.weight_norm(nn.Linear(bottleneck, prototypes, bias=False))
        self.last.parametrizations.weight.original0.data.fill_(1.0)
        self.last.parametrizations.weight.original0.requires_grad = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.last(F.normalize(self.mlp(x), dim=-1))


class Student(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.vit = make_vit()
        self.head = Head(192)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, 192))

    def tokens(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """All output tokens (B, 1+S², 192); masked patches replaced by the mask token."""
        v = self.vit
        t = v.patch_embed(x)  # (B, h, w, C) with dynamic_img_size
        if mask is not None:
            b, h, w, c = t.shape
            flat = t.reshape(b, h * w, c)
            flat = torch.where(mask.unsqueeze(-1), self.mask_token.to(flat.dtype), flat)
            t = flat.reshape(b, h, w, c)
        t = v._pos_embed(t)
        t = v.norm_pre(t)
        t = v.blocks(t)
        return v.norm(t)


def views(batch: torch.Tensor, size: int, gen: torch.Generator) -> torch.Tensor:
    """Two strongly augmented global views of a uint8 batch (B,3,H,W) → (2B,3,size,size)."""
    aug = v2.Compose([
        v2.RandomResizedCrop(size, scale=(0.35, 1.0), antialias=True),
        v2.RandomHorizontalFlip(),
        v2.RandomApply([v2.ColorJitter(0.4, 0.4, 0.4, 0.2)], p=0.8),
        v2.RandomGrayscale(0.2),
        v2.ToDtype(torch.float32, scale=True),
        v2.Normalize(MEAN, STD),
    ])
    out = [aug(img) for _ in range(2) for img in batch]
    return torch.stack(out)


def block_mask(b: int, s: int, ratio: float, gen: torch.Generator) -> torch.Tensor:
    """Random rectangular blocks covering about ``ratio`` of an s×s patch grid: (b, s²) bool."""
    mask = torch.zeros(b, s, s, dtype=torch.bool)
    for i in range(b):
        while mask[i].float().mean() < ratio:
            h = int(torch.randint(2, s // 2 + 1, (1,), generator=gen))
            w = int(torch.randint(2, s // 2 + 1, (1,), generator=gen))
            y = int(torch.randint(0, s - h + 1, (1,), generator=gen))
            x = int(torch.randint(0, s - w + 1, (1,), generator=gen))
            mask[i, y : y + h, x : x + w] = True
    return mask.flatten(1)


def dino_ce(student_logits: torch.Tensor, teacher_probs: torch.Tensor, temp: float) -> torch.Tensor:
    return -(teacher_probs * F.log_softmax(student_logits / temp, dim=-1)).sum(-1)


@torch.no_grad()
def patch_features(vit: VisionTransformer, images: torch.Tensor) -> torch.Tensor:
    t = vit.forward_features(images)
    return t[:, 1:]  # (B, S², C)


def hungarian_miou(pred: np.ndarray, target: np.ndarray, k: int, c: int) -> float:
    conf = np.bincount(pred * c + target, minlength=k * c).reshape(k, c)
    rows, cols = linear_sum_assignment(conf, maximize=True)
    mapped = np.zeros((c, c))
    for r, col in zip(rows, cols):
        mapped[col] += conf[r]
    tp = np.diag(mapped)
    iou = tp / np.maximum(mapped.sum(0) + mapped.sum(1) - tp, 1)
    return float(iou.mean() * 100)


def kmeans_probe(feats: torch.Tensor, labels: np.ndarray, k: int, seed: int = 0) -> float:
    """k-means (cosine) on patch features (N, C) vs per-patch majority labels (N,)."""
    from hpseg.evaluate import kmeans

    c = kmeans(feats, k, seed=seed)
    pred = (F.normalize(feats, dim=1) @ c.T).argmax(1).numpy()
    return hungarian_miou(pred, labels, k, k)


def probe(vit: VisionTransformer | None, n_classes: int = 5, n_images: int = 64) -> float:
    """k-means mIoU on the demo's validation scenes at patch level (majority label per patch)."""
    ds = SyntheticScenes("val", "eval", 96, n_images=n_images, n_classes=n_classes)
    imgs, labs = [], []
    for i in range(n_images):
        item = ds[i]
        imgs.append(item["img"])
        lab = item["label"].reshape(12, 8, 12, 8).permute(0, 2, 1, 3).reshape(144, 64)
        labs.append(torch.mode(lab, dim=1).values)
    x = torch.stack(imgs)
    y = torch.cat(labs).numpy()
    if vit is None:  # raw colour: mean RGB per 8×8 patch
        feats = F.avg_pool2d(x, 8).flatten(2).transpose(1, 2).reshape(-1, 3)
        return kmeans_probe(feats - feats.mean(0), y, n_classes)
    vit.eval()
    feats = torch.cat([patch_features(vit, x[i : i + 16]) for i in range(0, len(x), 16)]).reshape(-1, 192)
    return kmeans_probe(feats, y, n_classes)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=900)
    p.add_argument("--batch", type=int, default=24)
    p.add_argument("--crop", type=int, default=64, help="global crop size (pixels)")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path, default=ASSETS)
    args = p.parse_args()

    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    gen = torch.Generator().manual_seed(args.seed)
    student = Student()
    teacher = Student()
    teacher.load_state_dict(student.state_dict())
    for q in teacher.parameters():
        q.requires_grad = False
    params = [q for q in student.parameters() if q.requires_grad]
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.04)
    center_cls = torch.zeros(1, 256)
    center_patch = torch.zeros(1, 256)
    scenes = SyntheticScenes("pretrain", "eval", 96, n_images=10**7, seed=args.seed, n_classes=8)
    s = args.crop // 8
    start = time.time()
    log = []
    for step in range(args.steps):
        frac = step / max(1, args.steps - 1)
        lr = args.lr * min(1.0, (step + 1) / 50) * (0.5 * (1 + math.cos(math.pi * frac)))
        for g in opt.param_groups:
            g["lr"] = lr
        momentum = 1 - (1 - 0.99) * (0.5 * (1 + math.cos(math.pi * frac)))
        t_temp = 0.04 + (0.07 - 0.04) * min(1.0, step / 200)
        batch = torch.stack([
            torch.from_numpy(scenes.render(step * args.batch + i)[0]).permute(2, 0, 1) for i in range(args.batch)
        ])
        x = views(batch, args.crop, gen)  # (2B, 3, crop, crop): view 1 then view 2
        mask = block_mask(x.shape[0], s, 0.3, gen)
        with torch.no_grad():
            tt = teacher.tokens(x)
            t_logits = teacher.head(tt)  # (2B, 1+S², K)
            t_cls = F.softmax((t_logits[:, 0] - center_cls) / t_temp, dim=-1)
            t_patch = F.softmax((t_logits[:, 1:] - center_patch) / t_temp, dim=-1)
        st = student.tokens(x, mask)
        s_logits = student.head(st)
        b = args.batch
        # image level: each view's student CLS predicts the other view's teacher CLS
        swapped = torch.cat([t_cls[b:], t_cls[:b]])
        loss_cls = dino_ce(s_logits[:, 0], swapped, 0.1).mean()
        # patch level (iBOT): masked student patches predict the teacher's patches of the same view
        lp = dino_ce(s_logits[:, 1:], t_patch, 0.1)
        loss_patch = (lp * mask).sum() / mask.sum().clamp_min(1)
        loss = loss_cls + loss_patch
        opt.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(params, 3.0)
        opt.step()
        with torch.no_grad():
            for ps, pt in zip(student.parameters(), teacher.parameters()):
                pt.mul_(momentum).add_(ps.detach(), alpha=1 - momentum)
            center_cls.mul_(0.9).add_(t_logits[:, 0].mean(0, keepdim=True), alpha=0.1)
            center_patch.mul_(0.9).add_(t_logits[:, 1:].mean((0, 1)).unsqueeze(0), alpha=0.1)
        if step % 50 == 0 or step == args.steps - 1:
            row = {"step": step, "loss_cls": round(float(loss_cls.detach()), 4), "loss_patch": round(float(loss_patch.detach()), 4),
                   "lr": lr, "seconds": round(time.time() - start, 1)}
            log.append(row)
            print(json.dumps(row), flush=True)
    seconds = time.time() - start

    vit = teacher.vit
    vit.eval()
    pretrained = probe(vit)
    torch.manual_seed(args.seed)
    random_vit = make_vit()
    random_score = probe(random_vit)
    colour = probe(None)
    state = {k: v.detach().to(torch.float16).contiguous() for k, v in vit.state_dict().items()}
    args.out.mkdir(parents=True, exist_ok=True)
    save_file(state, str(args.out / "demo_vit.safetensors"), metadata={"arch": "vit 96px p8 d192 depth4 h3"})
    meta = {
        "architecture": {"img_size": 96, "patch_size": 8, "embed_dim": 192, "depth": 4, "num_heads": 3,
                         "mlp_ratio": 4, "qkv_bias": True, "layernorm_eps": 1e-6},
        "recipe": {
            "method": "DINO image-level self-distillation + iBOT masked patch distillation (EMA teacher, "
                      "centring, sharpening), two global views per scene, no labels",
            "steps": args.steps, "batch": args.batch, "crop": args.crop, "lr": args.lr, "seed": args.seed,
            "data": "SyntheticScenes split 'pretrain' (disjoint from the demo's train/val), 8 texture classes",
        },
        "seconds": round(seconds, 1),
        "machine": {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                    "threads": args.threads, "torch": torch.__version__},
        "probe": {
            "what": "k-means (K=5, cosine) on patch features of 64 demo validation scenes (96 px, 5 classes), "
                    "Hungarian-matched mIoU % against each patch's majority label",
            "pretrained_vit": round(pretrained, 2),
            "random_vit": round(random_score, 2),
            "raw_colour": round(colour, 2),
        },
        "log": log,
    }
    (args.out / "demo_vit.json").write_text(json.dumps(meta, indent=2))
    print(json.dumps(meta["probe"], indent=2))
    print(f"saved {args.out / 'demo_vit.safetensors'} in {seconds:.0f} s")


if __name__ == "__main__":
    main()
