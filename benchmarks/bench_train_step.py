"""Benchmark: one full HP training step (frozen backbone + heads + loss + optimiser step),
``hpseg`` against a straightforward implementation of the same step.

Usage::

    python benchmarks/bench_train_step.py                       # CPU-sized problem on the CPU
    python benchmarks/bench_train_step.py --scale paper --device cuda --repeats 20 --json out.json
    python benchmarks/bench_train_step.py --scale paper --device cuda --impls hpseg --repeats 0 --profile hpseg

``--profile IMPL[,IMPL]`` also runs, in a child process of its own, ``--warmup`` steps (at least
one) and one step under ``torch.profiler`` per implementation, and reports its top 20 kernels by device time
(CUDA; on CPU the top 20 operators by self CPU time) with their calls and share of the step.

Scales (ViT-S/8 architecture with random weights: nothing is downloaded):

* ``tiny``  — 64 px images (S=8, N=256 patches), batch 4, D=128, P=256 (trying the script);
* ``cpu``   — 96 px images (S=12, N=1,152 patches), batch 8, D=512, P=2048;
* ``paper`` — 224 px (S=28, N=50,176), batch 64, D=512, P=2048: the authors' COCO-Stuff step.

What one step is, for every implementation (docs/method.md §7, ``hpseg.train.train_step``): backbone
forward of the clean view (features + last-block attention logits) and of the photometric
view (features), segmentation head, EMA head, local propagation, projection head, the hidden-
positive loss, the consistency loss, both probes, the EMA update, ``zero_grad``, backward,
gradient clipping (head) and the four optimiser steps. Inputs are random tensors already on
the device (data loading is not timed); λ=0.5 (after warm-up), τ=0.8, ρ=0.02, α=0.05, σ=28.

Implementations:

* ``hpseg``       — :func:`hpseg.train.train_step`, exactly as the training loop calls it
  (:class:`~hpseg.train.HPObjective` with :class:`~hpseg.hidden_positives.HiddenPositiveLoss`,
  :class:`~hpseg.train.Optimizers`);
* ``hpseg-cached``— the same, with the clean view's backbone outputs read from a feature cache
  (``train.cache_features=true``): their backbone forward is skipped; the augmented view still
  runs it. Reading the memory-mapped cache from disk is *not* timed (tensors already in memory);
* ``hpseg-nondet``— ``hpseg`` with ``train.deterministic=false`` (PyTorch's default kernels):
  the difference to ``hpseg`` is what exact reruns and resumes cost;
* ``hpseg-fused`` — ``hpseg`` with ``loss.path=fused`` (the loss's two-pass Triton kernels);
  skipped, with the reason printed, where the installed hpseg or the machine has no such path
  (it raises ``HPSegError``) or Triton is missing;
* ``reference``   — the same step written plainly, with the per-image loss and per-image
  local propagation of ``benchmarks/reference_loss.py`` (the authors' structure).

Mixed precision: :class:`hpseg.runtime.Runtime` with ``precision="fp16"`` (the authors' setting;
float32 on CPU) around the step for all three; inside, ``hpseg`` uses float16 similarity
products on CUDA and the reference its float16 autocast, as the authors' code. Timings are
wall-clock seconds per step after warm-up steps, with device synchronisation; the backbone
part and the rest (heads, losses, backward, optimiser) are also timed separately. All
implementations are timed in one process, their steps interleaved in rotating order, so that
load from other processes on a shared machine affects each of them alike. Peak memory is
measured for each implementation alone, in its own child process, over one step after a warm-up
step: ``torch.cuda.max_memory_allocated`` on CUDA; on CPU the resident set size sampled every
0.5 ms by a thread during the step, minus the RSS before it, with glibc's malloc told to unmap
freed blocks of 128 KiB or more (so that RSS follows live memory). Before timing, each implementation
evaluates the step's loss without dropout at ρ=1 (no randomness) on the same seeded inputs;
the driver reports how far the implementations' values are apart. An implementation that fails
(e.g. CUDA out of memory: the reference keeps every image's ``(S², N)`` blocks for backward) is
reported as such and the others go on.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
SCALES: dict[str, dict[str, Any]] = {
    "tiny": {"backbone": "dino_vits8", "resolution": 64, "batch": 4, "D": 128, "P": 256, "classes": 27},
    "cpu": {"backbone": "dino_vits8", "resolution": 96, "batch": 8, "D": 512, "P": 2048, "classes": 27},
    "paper": {"backbone": "dino_vits8", "resolution": 224, "batch": 64, "D": 512, "P": 2048, "classes": 27},
}
IMPLS = ("hpseg", "hpseg-cached", "hpseg-nondet", "hpseg-fused", "reference")
#: kernels (operators on CPU) listed per profiled step
PROFILE_TOP = 20
HP = {"tau": 0.8, "rho": 0.02, "alpha": 0.05, "sigma": 28.0, "lam": 0.5, "ema_m": 0.99, "dropout": 0.1}


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _rss_mb() -> float:
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError):
        return float("nan")


def _peak_rss_mb() -> float:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10  # bytes on macOS, KiB on Linux


# ------------------------------------------------------------------------------------------
# worker: one implementation in a fresh process
# ------------------------------------------------------------------------------------------


class _Impl:
    """One implementation of the training step, with its own heads and optimisers: ``step`` (timed,
    with its backbone part measured apart), ``check`` (the loss at ρ = 1 without dropout) and
    ``plain`` (exactly one training step and nothing else: what ``--profile`` records)."""

    def __init__(self, name: str, step: Any, check: Any, plain: Any = None) -> None:
        self.name, self.step, self.check = name, step, check
        self.plain = step if plain is None else plain


def _setup(args: argparse.Namespace, impls: list[str]) -> tuple[dict[str, Any], dict[str, _Impl]]:
    """Shared inputs (seeded) and one :class:`_Impl` per name; all heads start identical."""
    import torch
    import torch.nn.functional as F

    sys.path.insert(0, str(HERE))
    sys.path.insert(0, str(HERE.parent / "src"))
    from reference_loss import reference_hidden_positive_loss, reference_local_propagation

    from hpseg.backbones import build_backbone
    from hpseg.config import TrainConfig
    from hpseg.errors import HPSegError
    from hpseg.hidden_positives import HiddenPositiveLoss, consistency_loss
    from hpseg.model import HPModel
    from hpseg.runtime import Runtime, make_deterministic
    from hpseg.train import (
        HPObjective,
        Optimizers,
        ReferencePools,
        backbone_outputs,
        flatten_patches,
        probe_cross_entropy,
        train_step,
    )

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    runtime = Runtime.create(device, "fp32" if args.no_amp else "fp16")
    cfg = SCALES[args.scale]
    b, res, d, p, c = cfg["batch"], cfg["resolution"], cfg["D"], cfg["P"], cfg["classes"]

    torch.manual_seed(0)
    backbone = build_backbone(cfg["backbone"], pretrained=False, img_size=res).to(device)  # frozen: shared
    gen = torch.Generator().manual_seed(1)
    images = torch.randn(b, 3, res, res, generator=gen).to(device)
    images_aug = (images + 0.3 * torch.randn(b, 3, res, res, generator=gen).to(device)).contiguous()
    labels = torch.randint(0, c, (b, res, res), generator=gen).to(device)
    batch = {"img": images, "img_aug": images_aug, "label": labels}

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    def new_model() -> Any:
        torch.manual_seed(2)  # identical heads for every implementation
        return HPModel.create(backbone, dim=d, n_classes=c, n_clusters=c, dropout=HP["dropout"]).to(device)

    # reference pools: P random patches of this batch's features / EMA codes (thresholds of the
    # same distribution as the anchors)
    with torch.no_grad():
        out = backbone(images)
        clean_feats, clean_attn = out.feats, out.attn_logits
        flat_f = flatten_patches(clean_feats).float()
        flat_s = flatten_patches(new_model().ema_head(clean_feats)).float()
        rows = torch.randint(flat_f.shape[0], (p,), generator=gen).to(device)
        pools = ReferencePools(p, HP["dropout"], torch.Generator())
        pools.agnostic = F.normalize(flat_f[rows], dim=1)
        pools.specific = F.normalize(flat_s[rows], dim=1)
        pool_ag, pool_sp = pools.agnostic, pools.specific
        cached = {
            "feats": clean_feats.half(),
            "attn_logits": clean_attn.half(),
        }  # as CachedFeatures stores them
    del out, flat_f, flat_s, clean_feats, clean_attn

    def deterministic(flag: bool, fn: Any) -> Any:
        """``fn`` run with deterministic kernels on (hpseg's default) or off (the others)."""

        def call() -> Any:
            make_deterministic(flag)
            return fn()

        return call

    def make(name: str) -> _Impl:
        impl = _make(name)
        flag = name in ("hpseg", "hpseg-cached", "hpseg-fused")
        return _Impl(name, deterministic(flag, impl.step), deterministic(flag, impl.check),
                     deterministic(flag, impl.plain))

    def _make(name: str) -> _Impl:
        model = new_model()
        optimizers = Optimizers(model, TrainConfig())  # the authors' four optimisers
        scaler = runtime.grad_scaler()

        def objective(rho: float) -> HPObjective:
            path = "fused" if name == "hpseg-fused" else "auto"  # HPSegError where there is no fused path
            loss = HiddenPositiveLoss(HP["tau"], rho, matmul_dtype=runtime.matmul_dtype, path=path)
            return HPObjective(model, loss, alpha=HP["alpha"], sigma=HP["sigma"])

        train_objective, check_objective = objective(HP["rho"]), objective(1.0)
        steps_done: list[int] = []  # the step number keys the negatives draw
        source = {**batch, **cached} if name == "hpseg-cached" else batch

        def hpseg_step() -> tuple[float, float, float]:
            """One ``train_step`` (it runs the backbone itself); its backbone part is estimated by
            a separate, untimed-in-total ``backbone_outputs`` call just before."""
            sync()
            t0 = time.perf_counter()
            backbone_outputs(model, source, runtime, need_aug=True)
            sync()
            t1 = time.perf_counter()
            train_objective.train(True)
            train_step(train_objective, model, source, pools, HP["lam"], optimizers, scaler, runtime,
                       ema_m=HP["ema_m"], step=len(steps_done))
            steps_done.append(1)
            sync()
            total, backbone_part = time.perf_counter() - t1, t1 - t0
            return total, backbone_part, total - backbone_part

        def hpseg_plain() -> None:
            train_objective.train(True)
            train_step(train_objective, model, source, pools, HP["lam"], optimizers, scaler, runtime,
                       ema_m=HP["ema_m"], step=len(steps_done))
            steps_done.append(1)

        def hpseg_check() -> float:
            with torch.no_grad():
                feats, attn, feats_aug = backbone_outputs(model, source, runtime, need_aug=True)
                check_objective.train(False)
                with runtime.autocast():
                    loss, _ = check_objective(feats, attn, feats_aug, labels, pool_ag, pool_sp, HP["lam"])
            return float(loss)

        def reference_backbone() -> tuple[torch.Tensor, ...]:
            with torch.no_grad(), runtime.autocast():
                out = backbone(images)
                feats_aug = backbone(images_aug, with_attention=False).feats
            return out.feats.float(), out.attn_logits.float(), feats_aug.float()

        def reference_objective(feats: Any, attn: Any, feats_aug: Any, rho: float, training: bool) -> Any:
            pdrop = HP["dropout"]

            def drop(x: torch.Tensor) -> torch.Tensor:
                return F.dropout2d(x, pdrop, training)

            model.head.train(training)
            with runtime.autocast():
                code = model.head(feats)
                with torch.no_grad():
                    code_ema = drop(model.ema_head(feats, dropout=pdrop if training else 0.0))
                code_lhp = drop(reference_local_propagation(attn.float(), code.float(), sigma=HP["sigma"]))
                z = model.projection(flatten_patches(code))
                z_lhp = model.projection(flatten_patches(code_lhp))
                f = F.normalize(flatten_patches(drop(feats)).float(), dim=1)
                s = F.normalize(flatten_patches(code_ema).float(), dim=1)
                loss_hp = reference_hidden_positive_loss(
                    z.float(), z_lhp.float(), f, s, pool_ag, pool_sp,
                    num_images=b, tau=HP["tau"], lam=HP["lam"], rho=rho,
                )  # fmt: skip
                z_aug = model.projection(flatten_patches(model.head(feats_aug)))
                loss_cons = consistency_loss(z.float(), z_aug.float())
                detached = code.detach()
                loss_linear = probe_cross_entropy(model.linear_probe(detached), labels)
                loss_cluster, _ = model.cluster_probe(detached, None)
            return loss_hp + HP["alpha"] * loss_cons + loss_linear + loss_cluster

        def reference_step() -> tuple[float, float, float]:
            """One training step: (total, backbone part, rest) wall-clock seconds."""
            sync()
            t0 = time.perf_counter()
            feats, attn, feats_aug = reference_backbone()
            sync()
            t1 = time.perf_counter()
            loss = reference_objective(feats, attn, feats_aug, HP["rho"], True)
            model.ema_head.ema_update(model.head, HP["ema_m"])
            optimizers.zero_grad()
            scaler.scale(loss).backward()
            optimizers.step(scaler)
            sync()
            t2 = time.perf_counter()
            if not torch.isfinite(loss):
                raise FloatingPointError("non-finite loss")
            return t2 - t0, t1 - t0, t2 - t1

        def reference_check() -> float:
            """The step's loss without dropout at rho=1 (deterministic), no update."""
            with torch.no_grad():
                feats, attn, feats_aug = reference_backbone()
                return float(reference_objective(feats, attn, feats_aug, 1.0, False))

        if name == "reference":
            return _Impl(name, reference_step, reference_check)
        return _Impl(name, hpseg_step, hpseg_check, hpseg_plain)

    built: dict[str, _Impl] = {}
    skipped: dict[str, str] = {}  # implementations this installation or machine does not have
    for name in impls:
        if name == "hpseg-fused" and importlib.util.find_spec("triton") is None:
            skipped[name] = "triton is not installed (pip install triton)"
            continue
        try:
            built[name] = make(name)
        except HPSegError as exc:  # e.g. a version without loss.path=fused
            skipped[name] = str(exc)
    return {"batch": b, "device": device, "sync": sync, "skipped": skipped}, built


def _error(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"


def _time_worker(args: argparse.Namespace) -> dict[str, Any]:
    """All implementations in one process, steps interleaved (A B C, B C A, …), so that load from
    other processes on a shared machine affects each of them alike."""
    import torch

    from hpseg.errors import HPSegError

    impls = args.impls.split(",")
    ctx, built = _setup(args, impls)
    results: dict[str, dict[str, Any]] = {name: {"impl": name} for name in impls}
    for name, reason in ctx["skipped"].items():
        results[name]["skipped"] = reason
    live = [name for name in impls if name in built]

    def run(name: str, fn: Any) -> Any:
        try:
            return fn()
        except HPSegError as exc:  # the path refuses this machine (e.g. fused without CUDA)
            results[name]["skipped"] = str(exc)
            live.remove(name)
            return None
        except (RuntimeError, FloatingPointError, MemoryError) as exc:  # CUDA OOM included
            results[name]["error"] = _error(exc)
            live.remove(name)
            if ctx["device"].type == "cuda":
                torch.cuda.empty_cache()
            return None

    for name in list(live):  # value check first, before any parameter update
        value = run(name, built[name].check)
        if value is not None:
            results[name]["check_loss"] = value
    times: dict[str, list[tuple[float, float, float]]] = {name: [] for name in impls}
    for r in range(args.warmup + args.repeats):
        order = live[r % len(live) :] + live[: r % len(live)] if live else []
        for name in order:
            t = run(name, built[name].step)
            if t is not None and r >= args.warmup:
                times[name].append(t)
    for name in live:
        tt = times[name]
        total = [t[0] for t in tt]
        res = results[name]
        res.update(
            times_s=total,
            backbone_s=[t[1] for t in tt],
            rest_s=[t[2] for t in tt],
            median_s=statistics.median(total),
            mean_s=statistics.fmean(total),
            min_s=min(total),
            median_backbone_s=statistics.median(t[1] for t in tt),
            median_rest_s=statistics.median(t[2] for t in tt),
        )
        res["images_per_s"] = ctx["batch"] / res["median_s"]
    return {"results": results}


class _RSSSampler:
    """Samples this process's resident set size every ``period`` seconds in a thread (torch
    kernels release the GIL); ``peak_mb`` is the largest value seen."""

    def __init__(self, period: float = 0.0005) -> None:
        import threading

        self.period, self.peak_mb = period, _rss_mb()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak_mb = max(self.peak_mb, _rss_mb())
            time.sleep(self.period)

    def __enter__(self) -> _RSSSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak_mb = max(self.peak_mb, _rss_mb())


def _memory_worker(args: argparse.Namespace) -> dict[str, Any]:
    """Peak memory of one implementation alone: 1 warm-up step, then 1 measured step."""
    import torch

    ctx, built = _setup(args, [args.impls])
    impl = built[args.impls]
    out: dict[str, Any] = {"impl": args.impls}
    try:
        impl.check()
        impl.step()
        ctx["sync"]()
        if ctx["device"].type == "cuda":
            torch.cuda.reset_peak_memory_stats(ctx["device"])
            base = torch.cuda.memory_allocated(ctx["device"])
            impl.step()
            ctx["sync"]()
            out["peak_mem_mb"] = torch.cuda.max_memory_allocated(ctx["device"]) / 2**20
            out["step_mem_mb"] = out["peak_mem_mb"] - base / 2**20
        else:
            rss_before = _rss_mb()
            with _RSSSampler() as sampler:
                impl.step()
            out["peak_rss_mb"] = sampler.peak_mb
            out["rss_before_step_mb"] = rss_before
            out["step_mem_mb"] = max(0.0, sampler.peak_mb - rss_before)
    except (RuntimeError, FloatingPointError, MemoryError) as exc:
        out["error"] = _error(exc)
    return out


def _top_kernels(prof: Any, device_kind: str, limit: int = PROFILE_TOP) -> dict[str, Any]:
    """The ``limit`` kernels with the most device time in ``prof`` (aggregated by name; on CPU the
    operators with the most self CPU time), with calls, milliseconds and share of the total."""
    from torch.autograd import DeviceType

    totals: dict[str, list[float]] = {}
    for event in prof.events():
        on_host = event.device_type == DeviceType.CPU
        if device_kind == "cpu":
            us = event.self_cpu_time_total if on_host else 0.0
        else:
            us = 0.0 if on_host else event.time_range.elapsed_us()  # a kernel, copy or memset on the device
        if us > 0:
            entry = totals.setdefault(event.name, [0, 0.0])
            entry[0] += 1
            entry[1] += us
    grand = sum(us for _, us in totals.values()) or 1.0
    ranked = sorted(totals.items(), key=lambda kv: -kv[1][1])[:limit]
    return {
        "measure": "self CPU time per operator" if device_kind == "cpu" else "device time per kernel",
        "total_ms": grand / 1e3,
        "distinct": len(totals),
        "top": [{"name": name, "calls": int(calls), "ms": us / 1e3, "share": us / grand} for name, (calls, us) in ranked],
    }


def _profile_worker(args: argparse.Namespace) -> dict[str, Any]:
    """Per implementation of ``--profile``: ``--warmup`` steps (at least 1), then 1 step under ``torch.profiler``."""
    from torch.profiler import ProfilerActivity, profile

    from hpseg.errors import HPSegError

    impls = [i for i in args.profile.split(",") if i]
    ctx, built = _setup(args, impls)
    device = ctx["device"]
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    out: dict[str, Any] = {name: {"skipped": reason} for name, reason in ctx["skipped"].items()}
    for name, impl in built.items():
        try:
            impl.check()
            for _ in range(max(1, args.warmup)):  # first calls: allocator, cuBLAS handles, Triton's JIT
                impl.plain()
            ctx["sync"]()
            with profile(activities=activities) as prof:
                t0 = time.perf_counter()
                impl.plain()
                ctx["sync"]()
                wall = time.perf_counter() - t0
            out[name] = {"profiled_step_s": wall, **_top_kernels(prof, device.type)}
        except HPSegError as exc:
            out[name] = {"skipped": str(exc)}
        except (RuntimeError, FloatingPointError, MemoryError) as exc:
            out[name] = {"error": _error(exc)}
    return {"profile": out}


def _print_profile(profiles: dict[str, Any]) -> None:
    for name, prof in profiles.items():
        if "top" not in prof:
            print(f"  profile {name}: {'SKIPPED ' + prof['skipped'] if 'skipped' in prof else 'ERROR ' + str(prof.get('error'))}")
            continue
        print(f"  profile {name}: one step {prof['profiled_step_s'] * 1e3:.1f} ms wall (under the profiler), "
              f"{prof['total_ms']:.1f} ms {prof['measure']} in {prof['distinct']} distinct; top {len(prof['top'])}:")
        for k, row in enumerate(prof["top"], 1):
            print(f"    {k:2d}. {row['ms']:9.2f} ms {row['share']:6.1%} {row['calls']:5d}x  {row['name'][:110]}")


# ------------------------------------------------------------------------------------------
# driver
# ------------------------------------------------------------------------------------------


def _run_child(args: argparse.Namespace, worker: str, impls: str) -> dict[str, Any]:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", worker, "--impls", impls]
    if worker == "profile":
        cmd += ["--profile", impls]
    cmd += ["--scale", args.scale, "--device", args.device]
    cmd += ["--repeats", str(args.repeats), "--warmup", str(args.warmup)]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    if args.no_amp:
        cmd.append("--no-amp")
    env = dict(os.environ)
    if worker == "memory":
        # glibc: serve allocations >= 128 KiB by mmap and unmap them when freed, so that the
        # resident size follows live memory instead of the allocator's caching
        env.update(MALLOC_MMAP_THRESHOLD_="131072", MALLOC_TRIM_THRESHOLD_="131072")
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False, env=env)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        return {"error": f"{worker} worker exited with {proc.returncode}: {' | '.join(tail)}"}
    return dict(json.loads(lines[-1]))


def _machine(device: str, threads: int | None) -> dict[str, Any]:
    import torch

    if threads:
        torch.set_num_threads(threads)
    info: dict[str, Any] = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu": _cpu_name(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "load_average_1m_at_end": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,
    }
    if device == "cuda" and torch.cuda.is_available():
        info["device_name"] = torch.cuda.get_device_name(0)
        info["cuda"] = torch.version.cuda
    else:
        info["device_name"] = "cpu"
    return info


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--scale", choices=sorted(SCALES), default="cpu")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--no-amp", action="store_true", help="no mixed precision on CUDA")
    parser.add_argument(
        "--impls", default=",".join(IMPLS), help=f"comma-separated subset of {','.join(IMPLS)}"
    )
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    parser.add_argument(
        "--memory-impls", default=None, help="peak memory of these implementations only (default: all)"
    )
    parser.add_argument(
        "--profile", default="", help="also profile one step of these implementations (top kernels; comma-separated)"
    )
    parser.add_argument("--worker", choices=["time", "memory", "profile"], help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.worker:
        worker = {"time": _time_worker, "memory": _memory_worker, "profile": _profile_worker}[args.worker]
        print(json.dumps(worker(args)))
        return 0

    impls = [i.strip() for i in args.impls.split(",") if i.strip()] if args.repeats > 0 else []
    profiled = [i.strip() for i in args.profile.split(",") if i.strip()]
    unknown = [i for i in impls + profiled if i not in IMPLS]
    if unknown:
        parser.error(f"unknown implementation(s) {unknown}: choose from {', '.join(IMPLS)}")
    if not impls and not profiled:
        parser.error("nothing to do: --repeats 0 times nothing; give --profile IMPL")
    cfg = SCALES[args.scale]
    s = cfg["resolution"] // 8
    settings = {
        **cfg,
        "S": s,
        "N": cfg["batch"] * s * s,
        "scale": args.scale,
        "device": args.device,
        **HP,
        "chunk_images": 8,
        "amp": (not args.no_amp) and args.device == "cuda",
        "repeats": args.repeats,
        "warmup": args.warmup,
        "weights": "random (architecture only)",
        "timed": "one training step (backbone fwd x2 + heads + losses + backward + 4 optimiser steps), wall clock",
        "timing": "all implementations in one process, steps interleaved in rotating order",
        "peak_mem_method": (
            "one implementation alone in a child process, after 1 warm-up step: "
            + (
                "torch.cuda.max_memory_allocated during 1 step (peak_mem_mb: absolute, model and inputs "
                "included; step_mem_mb: above the memory allocated before the step)"
                if args.device == "cuda"
                else "resident set size sampled every 0.5 ms during 1 step (peak_rss_mb: whole process; "
                "step_mem_mb: growth over the RSS before the step), glibc malloc set to unmap freed blocks "
                ">= 128 KiB so that RSS follows live memory (plus allocator overhead)"
            )
        ),
    }
    timed = _run_child(args, "time", ",".join(impls)) if impls else {}
    results: dict[str, dict[str, Any]] = {}
    for impl in impls:
        results[impl] = dict(timed.get("results", {}).get(impl, {"impl": impl, "error": timed.get("error")}))
        if "error" in results[impl] or "skipped" in results[impl]:
            continue
        if args.memory_impls is not None and impl not in args.memory_impls.split(","):
            continue
        memory = _run_child(args, "memory", impl)
        for key in ("peak_mem_mb", "step_mem_mb", "peak_rss_mb", "rss_before_step_mb"):
            if key in memory:
                results[impl][key] = memory[key]
        if "error" in memory:
            results[impl]["memory_error"] = memory["error"]
    report: dict[str, Any] = {
        "machine": _machine(args.device, args.threads),
        "settings": settings,
        "results": results,
    }
    if profiled:
        prof = _run_child(args, "profile", ",".join(profiled))
        report["profile"] = prof.get("profile", {name: {"error": prof.get("error")} for name in profiled})
    ref = results.get("reference", {})
    for impl in ("hpseg", "hpseg-cached", "hpseg-nondet", "hpseg-fused"):
        ours = results.get(impl, {})
        if "median_s" in ours and "median_s" in ref:
            report[f"speedup_{impl}_vs_reference_median"] = ref["median_s"] / ours["median_s"]
            report[f"speedup_{impl}_vs_reference_rest_median"] = ref["median_rest_s"] / ours["median_rest_s"]
        if "check_loss" in ours and "check_loss" in ref:
            report[f"check_loss_rel_diff_{impl}"] = abs(ours["check_loss"] - ref["check_loss"]) / abs(
                ref["check_loss"]
            )

    m, st = report["machine"], settings
    print(
        f"machine: {m['cpu']} ({m['cpu_count']} cores, {m['torch_threads']} torch threads), "
        f"device {m['device_name']}, torch {m['torch']}, {m['platform']}, load average {m['load_average_1m_at_end']}"
    )
    print(
        f"step: scale={st['scale']} {st['backbone']} (random weights) {st['resolution']}px S={st['S']} "
        f"batch={st['batch']} N={st['N']} D={st['D']} P={st['P']} C={st['classes']} tau={st['tau']} "
        f"rho={st['rho']} alpha={st['alpha']} lam={st['lam']} amp={st['amp']} "
        f"repeats={st['repeats']} warmup={st['warmup']}"
    )
    for name, r in results.items():
        if "skipped" in r:
            print(f"  {name:13s} SKIPPED {r['skipped']}")
            continue
        if "error" in r:
            print(f"  {name:13s} ERROR {r['error']}")
            continue
        print(
            f"  {name:13s} {r['images_per_s']:8.2f} img/s  step median {r['median_s'] * 1e3:9.1f} ms "
            f"(backbone {r['median_backbone_s'] * 1e3:8.1f} + rest {r['median_rest_s'] * 1e3:8.1f})  "
            f"min {r['min_s'] * 1e3:9.1f} ms  step mem {r.get('step_mem_mb', float('nan')):8.1f} MiB  "
            f"check loss {r['check_loss']:.5f}"
        )
    for impl in ("hpseg", "hpseg-cached", "hpseg-nondet", "hpseg-fused"):
        key = f"speedup_{impl}_vs_reference_median"
        if key in report:
            print(
                f"  speed-up {impl} vs reference: step {report[key]:.2f}x, "
                f"non-backbone part {report[f'speedup_{impl}_vs_reference_rest_median']:.2f}x; "
                f"check-loss rel. diff {report[f'check_loss_rel_diff_{impl}']:.1e}"
            )
    if results:
        print(f"  peak memory: {settings['peak_mem_method']}")
    _print_profile(report.get("profile", {}))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    failed = [r for r in [*results.values(), *report.get("profile", {}).values()] if "error" in r]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
