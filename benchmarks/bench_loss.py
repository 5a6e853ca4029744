"""Benchmark: forward + backward of the hidden-positive loss — ``hpseg``'s sparse and dense paths
against the straightforward per-image formulation in ``reference_loss.py`` (the authors' structure).

Usage::

    python benchmarks/bench_loss.py --scale wide --threads 1 --repeats 5 --json out.json
    python benchmarks/bench_loss.py --scale paper --impls sparse --repeats 1 --warmup 0
    python benchmarks/bench_loss.py --scale paper --device cuda --repeats 10 --json out.json

Scales (``--scale``): ``cpu`` B=8, S=14 (N=1,568), D=512, F=384, P=2048; ``narrow`` B=4, S=28
(N=3,136), D=64, F=96, P=256; ``wide`` B=4, S=28 (N=3,136) at the paper's widths D=512, F=384,
P=2048; ``paper`` B=64, S=28 (N=50,176), D=512, F=384, P=2048 (the authors' COCO batch);
``paper16`` the paper's batch with widths D=F=16. ``--width`` overrides D and F.

Inputs (``--inputs``, seeded, identical for every implementation): ``clustered`` (default) —
every image holds a few of 27 classes; a patch's backbone feature is its class centre plus an
image-specific offset plus noise (so patches of one image resemble each other more than the
pool entries, which come from other images, as with real features), the EMA code likewise in
its own space, ``z``/``z_lhp`` are noisy copies of the code; pools are drawn from the same model
with fresh images. ``random`` — independent uniform unit vectors (positives are then rarest,
about ``2/P`` of candidates). Both are L2-normalised. The densities observed on them (task-agnostic
and task-specific positives per anchor, kept anchors, denominator size, pairs evaluated by the
sparse path) are reported.

Implementations (``--impls``): ``sparse`` = ``hidden_positive_loss(path="sparse")``, ``dense`` =
``path="dense"``, ``dense-compiled`` = the dense path with ``compile_chunks=True``
(``loss.compile=true``: its chunk through ``torch.compile``; meant for GPUs, where Inductor fuses the
element-wise passes; the first call compiles), ``fused`` = ``path="fused"`` (``loss.path=fused``: the
two-pass Triton kernels; skipped, with the reason printed, where the installed hpseg or the machine
has no such path — it raises ``HPSegError`` — or Triton is missing), ``reference`` =
``reference_loss.reference_hidden_positive_loss``. They are timed
in one process, interleaved (A B C, B C A, …) after warm-up runs, so that load from other
processes affects them alike; min and median of the wall-clock seconds of
``loss = f(...); loss.backward()`` (device synchronised on CUDA) are reported. ``hpseg`` draws its
negatives as a function of (seed, step) (``hidden_positives/negatives.py``), so the sparse and
dense paths see identical negatives and must agree on the loss (checked); the reference draws its own, and a no-grad evaluation at
ρ = 1 (no randomness) checks that it agrees with ``hpseg``.

Peak memory: each implementation alone in a child process over one forward + backward: on CUDA
``torch.cuda.max_memory_allocated`` minus the inputs; on CPU the peak resident set size
``ru_maxrss`` minus the resident size just before the step, with glibc malloc told to unmap
every freed block of 128 KiB or more (so the figure follows live memory plus allocator overhead,
not malloc's caching). ``--no-memory`` skips it; ``--memory-impls A,B`` measures it for those
implementations only (a child per implementation costs a process start and, for ``dense-compiled``,
a second compilation).
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
SCALES = {
    "cpu": {"B": 8, "S": 14, "D": 512, "F": 384, "P": 2048},
    "narrow": {"B": 4, "S": 28, "D": 64, "F": 96, "P": 256},
    "wide": {"B": 4, "S": 28, "D": 512, "F": 384, "P": 2048},
    "paper": {"B": 64, "S": 28, "D": 512, "F": 384, "P": 2048},
    "paper16": {"B": 64, "S": 28, "D": 16, "F": 16, "P": 2048},
}
IMPLS = ("sparse", "dense", "dense-compiled", "fused", "reference")
#: hpseg's implementations (``HiddenPositiveLoss`` modules): the others use the reference
HPSEG_IMPLS = ("sparse", "dense", "dense-compiled", "fused")


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _rss_mb() -> float:
    """Current resident set size (Linux /proc), MiB."""
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError):
        return float("nan")


def _peak_rss_mb() -> float:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10  # bytes on macOS, KiB on Linux


def _config(args: argparse.Namespace) -> dict[str, int]:
    cfg = dict(SCALES[args.scale])
    if args.width:
        cfg["D"] = cfg["F"] = args.width
    cfg["N"] = cfg["B"] * cfg["S"] ** 2
    return cfg


# ------------------------------------------------------------------------------------------
# inputs
# ------------------------------------------------------------------------------------------


def make_inputs(kind: str, cfg: dict[str, int], device: Any, seed: int = 0) -> dict[str, Any]:
    """The benchmark's inputs (module docstring): ``z, z_lhp`` (N, D), ``feats`` (N, F),
    ``code_ema`` (N, D), ``pool_agnostic`` (P, F), ``pool_specific`` (P, D), all unit rows."""
    import torch
    import torch.nn.functional as F

    b, s, d, f, p = cfg["B"], cfg["S"], cfg["D"], cfg["F"], cfg["P"]
    n = b * s * s
    gen = torch.Generator(device=device).manual_seed(seed)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen, device=device)

    def unit(x: torch.Tensor) -> torch.Tensor:
        return F.normalize(x, dim=-1)

    if kind == "random":
        return {
            "z": unit(randn(n, d)),
            "z_lhp": unit(randn(n, d)),
            "feats": unit(randn(n, f)),
            "code_ema": unit(randn(n, d)),
            "pool_agnostic": unit(randn(p, f)),
            "pool_specific": unit(randn(p, d)),
        }
    classes, per_image_classes = 27, 3
    centres_f, centres_d = unit(randn(classes, f)), unit(randn(classes, d))

    def patches(images: int, rows: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(images·rows,) class labels (a few classes per image) and image ids."""
        present = torch.stack(
            [torch.randperm(classes, generator=gen, device=device)[:per_image_classes] for _ in range(images)]
        )
        pick = torch.randint(per_image_classes, (images, rows), generator=gen, device=device)
        labels = torch.gather(present, 1, pick).reshape(-1)
        return labels, torch.arange(images, device=device).repeat_interleave(rows)

    def embed(labels: torch.Tensor, image: torch.Tensor, images: int, centres: torch.Tensor) -> torch.Tensor:
        width = centres.shape[1]
        offset = unit(randn(images, width))[image]  # what the patches of one image share
        return unit(centres[labels] + 0.2 * offset + 0.9 * unit(randn(labels.numel(), width)))

    labels, image = patches(b, s * s)
    feats = embed(labels, image, b, centres_f)
    code_ema = embed(labels, image, b, centres_d)
    pool_labels, pool_image = patches(p, 1)
    return {
        "z": unit(code_ema + 0.5 * unit(randn(n, d))),
        "z_lhp": unit(code_ema + 0.5 * unit(randn(n, d))),
        "feats": feats,
        "code_ema": code_ema,
        "pool_agnostic": embed(pool_labels, pool_image, p, centres_f),
        "pool_specific": embed(pool_labels, pool_image, p, centres_d),
    }


# ------------------------------------------------------------------------------------------
# worker: the implementations in a fresh process
# ------------------------------------------------------------------------------------------


def _worker(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    sys.path.insert(0, str(HERE))
    sys.path.insert(0, str(HERE.parent / "src"))
    from reference_loss import reference_hidden_positive_loss

    from hpseg.errors import HPSegError
    from hpseg.hidden_positives import HiddenPositiveLoss

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    cfg = _config(args)
    b = cfg["B"]
    x = make_inputs(args.inputs, cfg, device)
    rest = (x["feats"], x["code_ema"], x["pool_agnostic"], x["pool_specific"])
    impls = [i for i in args.impls.split(",") if i]
    skipped: dict[str, str] = {}  # implementations this installation or machine does not have
    if "fused" in impls and importlib.util.find_spec("triton") is None:
        skipped["fused"] = "triton is not installed (pip install triton)"
    modules: dict[str, Any] = {}
    for impl in HPSEG_IMPLS:
        if impl in skipped:
            continue
        try:
            modules[impl] = HiddenPositiveLoss(
                args.tau, args.rho, path=impl.split("-")[0], memory_gb=args.memory_gb,
                chunk_images=args.chunk_images,
                compile_chunks=impl == "dense-compiled",  # torch.compile of the dense chunk (loss.compile=true)
            )
        except HPSegError as exc:  # e.g. a version without loss.path=fused
            skipped[impl] = str(exc)

    def loss_fn(impl: str, z: torch.Tensor, z_lhp: torch.Tensor, rho: float | None = None) -> torch.Tensor:
        if impl == "reference":
            r = args.rho if rho is None else rho
            return reference_hidden_positive_loss(
                z, z_lhp, *rest, num_images=b, tau=args.tau, lam=args.lam, rho=r
            )
        module = modules[impl]
        module.rho = args.rho if rho is None else rho
        module.seed = 1  # the negatives are a function of (seed, step): the same for both paths
        return module(z, z_lhp, *rest, num_images=b, lam=args.lam, step=0)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    def step(impl: str) -> tuple[float, float]:
        z = x["z"].clone().requires_grad_(True)
        z_lhp = x["z_lhp"].clone().requires_grad_(True)
        sync()
        t0 = time.perf_counter()
        loss = loss_fn(impl, z, z_lhp)
        loss.backward()
        sync()
        elapsed = time.perf_counter() - t0
        assert z.grad is not None and z_lhp.grad is not None
        if not (torch.isfinite(loss) and torch.isfinite(z.grad).all() and torch.isfinite(z_lhp.grad).all()):
            raise FloatingPointError(f"{impl}: non-finite loss or gradient")
        return elapsed, float(loss.detach())

    out: dict[str, Any] = {"results": {i: {"impl": i} for i in impls}}
    for impl, reason in skipped.items():
        if impl in impls:
            out["results"][impl]["skipped"] = reason
    impls = [i for i in impls if i not in skipped]
    if args.measure == "memory" and impls:  # one implementation, one step, in a process of its own
        impl = impls[0]
        tiny = {k: v[: 4 * 4] if k in ("z", "z_lhp", "feats", "code_ema") else v for k, v in x.items()}
        HiddenPositiveLoss(args.tau, args.rho)(  # lazy initialisation is not the loss's memory
            tiny["z"].clone().requires_grad_(True),
            tiny["z_lhp"],
            tiny["feats"],
            tiny["code_ema"],
            tiny["pool_agnostic"],
            tiny["pool_specific"],
            num_images=4,
            lam=args.lam,
        ).backward()
        r = out["results"][impl]
        try:
            if device.type == "cuda":
                base = torch.cuda.memory_allocated(device)
                torch.cuda.reset_peak_memory_stats(device)
                r["seconds"], _ = step(impl)
                r["peak_mem_mb"] = (torch.cuda.max_memory_allocated(device) - base) / 2**20
            else:
                rss_before = _rss_mb()
                r["seconds"], _ = step(impl)
                r["peak_mem_mb"] = max(0.0, _peak_rss_mb() - rss_before)
                r["rss_before_mb"] = rss_before
        except HPSegError as exc:  # the path refuses these inputs or this machine
            r["skipped"] = str(exc)
        except (RuntimeError, FloatingPointError, MemoryError) as exc:
            r["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
        return out
    if args.measure == "memory":
        return out

    times: dict[str, list[float]] = {i: [] for i in impls}
    values: dict[str, float] = {}
    failed: dict[str, str] = {}
    rounds = args.warmup + args.repeats
    for k in range(rounds):  # interleaved: A B C, B C A, C A B, ...
        order = impls[k % len(impls) :] + impls[: k % len(impls)]
        for impl in order:
            if impl in failed:
                continue
            try:
                seconds, value = step(impl)
            except HPSegError as exc:  # the path refuses these inputs or this machine (fused without CUDA)
                out["results"][impl]["skipped"] = str(exc)
                failed[impl] = ""
                continue
            except (RuntimeError, FloatingPointError, MemoryError) as exc:  # OOM included
                failed[impl] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
                continue
            values[impl] = value
            if k >= args.warmup:
                times[impl].append(seconds)
            print(f"  round {k}: {impl} {seconds:.3f} s", file=sys.stderr, flush=True)
    for impl in impls:
        r = out["results"][impl]
        if impl in failed:
            if "skipped" not in r:
                r["error"] = failed[impl]
            continue
        ts = times[impl]
        r.update(times_s=ts, min_s=min(ts), median_s=statistics.median(ts), mean_s=statistics.fmean(ts))
        r["loss"] = values[impl]
        if impl in modules:
            r["stats"] = dict(modules[impl].stats)
    if args.check_rho1:
        with torch.no_grad():
            for impl in impls:
                if impl not in failed:
                    out["results"][impl]["loss_rho1"] = float(loss_fn(impl, x["z"], x["z_lhp"], rho=1.0))
    return out


# ------------------------------------------------------------------------------------------
# driver
# ------------------------------------------------------------------------------------------


def _run_child(args: argparse.Namespace, impls: str, measure: str) -> dict[str, Any]:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", "--measure", measure, "--impls", impls]
    for key in (
        "scale",
        "device",
        "repeats",
        "warmup",
        "tau",
        "lam",
        "rho",
        "chunk_images",
        "threads",
        "inputs",
        "memory_gb",
        "width",
    ):
        value = getattr(args, key)
        if value is not None:
            cmd += [f"--{key.replace('_', '-')}", str(value)]
    if args.check_rho1 and measure == "time":
        cmd.append("--check-rho1")
    env = dict(os.environ)
    if measure == "memory":
        # glibc: serve every allocation ≥ 128 KiB by mmap and unmap it on free, so that the
        # resident size follows live memory rather than the allocator's adaptive caching
        env.update(MALLOC_MMAP_THRESHOLD_="131072", MALLOC_TRIM_THRESHOLD_="131072")
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, check=False, env=env)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        return {"error": f"{measure} worker exited with {proc.returncode}"}
    return json.loads(lines[-1])


def _machine(device: str) -> dict[str, Any]:
    import torch

    info: dict[str, Any] = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu": _cpu_name(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "load_average_1_5_15": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
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
    parser.add_argument("--width", type=int, default=None, help="override D and F")
    parser.add_argument("--inputs", choices=["clustered", "random"], default="clustered")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--impls", default=None, help=f"comma-separated subset of {','.join(IMPLS)}")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--tau", type=float, default=0.8)
    parser.add_argument("--lam", type=float, default=0.5)
    parser.add_argument("--rho", type=float, default=0.02)
    parser.add_argument(
        "--memory-gb", type=float, default=None, help="hpseg's memory budget (default: device's)"
    )
    parser.add_argument(
        "--chunk-images", type=int, default=None, help="fixed anchor chunk (overrides the budget)"
    )
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--skip-reference", action="store_true", help="time hpseg only")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory children")
    parser.add_argument("--memory-impls", default=None, help="peak memory of these implementations only")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--check-rho1", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--measure", choices=["time", "memory"], default="time", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    cfg = _config(args)
    if args.impls is None:
        big = cfg["N"] > 20_000
        args.impls = "sparse" if big else ("sparse,dense" if args.skip_reference else ",".join(IMPLS))
    if args.worker:
        print(json.dumps(_worker(args)))
        return 0
    impls = [i for i in args.impls.split(",") if i]
    if any(i not in IMPLS for i in impls):
        parser.error(f"--impls: choose from {', '.join(IMPLS)}")
    args.check_rho1 = "reference" in impls

    settings = {
        **cfg,
        "scale": args.scale,
        "inputs": args.inputs,
        "device": args.device,
        "tau": args.tau,
        "lam": args.lam,
        "rho": args.rho,
        "memory_gb": args.memory_gb,
        "chunk_images": args.chunk_images,
        "threads": args.threads,
        "repeats": args.repeats,
        "warmup": args.warmup,
        "timed": "forward + backward, wall clock, implementations interleaved in one process",
        "products": "float16 masks/dense logits (hpseg), float16 autocast (reference)"
        if args.device == "cuda"
        else "float32",
        "peak_mem_method": (
            "torch.cuda.max_memory_allocated minus inputs, one step per child process"
            if args.device == "cuda"
            else "ru_maxrss minus RSS before one forward+backward, one implementation per child process, "
            "glibc malloc unmapping freed blocks >= 128 KiB (live tensors + allocator overhead)"
        ),
    }
    report: dict[str, Any] = {"machine": _machine(args.device), "settings": settings}
    timed = _run_child(args, args.impls, "time")
    results: dict[str, Any] = timed.get(
        "results", {i: {"impl": i, "error": timed.get("error")} for i in impls}
    )
    if not args.no_memory:
        measured = impls if args.memory_impls is None else args.memory_impls.split(",")
        for impl in impls:
            if "min_s" not in results[impl] or impl not in measured:  # failed, skipped or not asked for
                continue
            mem = (
                _run_child(args, impl, "memory")
                .get("results", {})
                .get(impl, {"error": "memory child failed"})
            )
            if "error" in mem or "skipped" in mem:
                results[impl]["peak_mem_error"] = mem.get("error", mem.get("skipped"))
            else:
                results[impl]["peak_mem_mb"] = mem["peak_mem_mb"]
                results[impl].setdefault("single_step_s", mem.get("seconds"))
    report["results"] = results
    report["machine"]["load_average_after"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None

    ok = {k: r for k, r in results.items() if "median_s" in r}
    if "reference" in ok:
        for impl in HPSEG_IMPLS:
            if impl in ok:
                report[f"speedup_{impl}_median"] = ok["reference"]["median_s"] / ok[impl]["median_s"]
                report[f"speedup_{impl}_min"] = ok["reference"]["min_s"] / ok[impl]["min_s"]
    for impl in ("sparse", "fused"):  # same negatives as the dense path: the same loss up to rounding
        if impl in ok and "dense" in ok:
            report[f"{impl}_vs_dense_loss_rel_diff"] = abs(ok[impl]["loss"] - ok["dense"]["loss"]) / abs(
                ok["dense"]["loss"]
            )
    if "reference" in ok and "loss_rho1" in ok["reference"]:
        for impl in HPSEG_IMPLS:
            if impl in ok and "loss_rho1" in ok[impl]:
                report[f"{impl}_vs_reference_loss_rho1_rel_diff"] = abs(
                    ok[impl]["loss_rho1"] - ok["reference"]["loss_rho1"]
                ) / abs(ok["reference"]["loss_rho1"])

    m, st = report["machine"], settings
    print(
        f"machine: {m['cpu']} ({m['cpu_count']} cores), device {m['device_name']}, torch {m['torch']}, "
        f"load average {m['load_average_1_5_15']} -> {m['load_average_after']}"
    )
    print(
        f"problem: scale={st['scale']} inputs={st['inputs']} B={st['B']} S={st['S']} N={st['N']} D={st['D']} "
        f"F={st['F']} P={st['P']} tau={st['tau']} lam={st['lam']} rho={st['rho']} threads={st['threads']}"
    )
    for name, r in results.items():
        if "skipped" in r:
            print(f"  {name:14s} SKIPPED {r['skipped']}")
            continue
        if "median_s" not in r:
            print(f"  {name:14s} ERROR {r.get('error')}")
            continue
        print(
            f"  {name:14s} min {r['min_s'] * 1e3:9.1f} ms  median {r['median_s'] * 1e3:9.1f} ms  "
            f"peak mem {r.get('peak_mem_mb', float('nan')):9.1f} MiB  loss {r['loss']:.6f}"
        )
        if "stats" in r:
            s = r["stats"]
            print(
                f"            path {s['path']}, chunk {s['chunk_images']} images; per anchor: "
                f"{s['positives_per_anchor']:.1f} agnostic positives ({s['positives_per_anchor'] / st['N']:.2%}), "
                f"{s['specific_per_anchor']:.1f} specific; kept anchors {s['kept_anchor_fraction']:.1%}; "
                f"denominator {s['denominator_fraction']:.2%} of N; pairs evaluated {s['pair_fraction']:.2%}"
            )
    for key in sorted(k for k in report if k.startswith("speedup")):
        print(f"  {key}: {report[key]:.2f}x")
    for key in sorted(k for k in report if k.endswith("rel_diff")):
        print(f"  {key}: {report[key]:.2e}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return 0 if all("median_s" in r or "skipped" in r for r in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
