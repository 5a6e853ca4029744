"""Benchmark: forward + backward of ``hpseg.hidden_positives.hidden_positive_loss`` against the
straightforward per-image formulation in ``reference_loss.py`` (the authors' structure).

Usage::

    python benchmarks/bench_loss.py                         # CPU-sized problem on the CPU
    python benchmarks/bench_loss.py --scale paper --device cuda --repeats 10 --json out.json

Scales: ``cpu`` = B=8 images of S=14 (N=1,568 patches); ``paper`` = B=64, S=28 (N=50,176), the
authors' COCO batch. Both use D=512, F=384, P=2048 and random L2-normalised inputs (seeded,
identical for both implementations).

Each implementation runs in its own child process so that peak memory is measured cleanly:
on CUDA ``torch.cuda.max_memory_allocated`` minus the inputs, in the timing process; on CPU the
peak resident set size ``ru_maxrss`` minus the resident size just before one forward + backward,
in a second child whose glibc malloc unmaps every freed block of 128 KiB or more (so the figure
follows live memory, plus allocator overhead, instead of malloc's adaptive caching; that setting
slows allocation, hence the separate process). Timings are wall-clock seconds of
``loss = f(...); loss.backward()`` after warm-up runs, with device
synchronisation on CUDA. ``hpseg`` uses float16 similarity products on CUDA (float32 on CPU);
the reference runs under float16 autocast on CUDA and in float32 on CPU. Both draw their own
Bernoulli(rho) negatives; a no-grad evaluation at rho=1 (no randomness) checks that the two
agree on the value.
"""

from __future__ import annotations

import argparse
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
    "paper": {"B": 64, "S": 28, "D": 512, "F": 384, "P": 2048},
}


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


# ------------------------------------------------------------------------------------------
# worker: one implementation in a fresh process
# ------------------------------------------------------------------------------------------


def _worker(args: argparse.Namespace) -> dict[str, Any]:
    import torch
    import torch.nn.functional as F

    sys.path.insert(0, str(HERE))
    sys.path.insert(0, str(HERE.parent / "src"))
    from reference_loss import reference_hidden_positive_loss

    from hpseg.hidden_positives import hidden_positive_loss

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    cfg = SCALES[args.scale]
    b, s, d, f, p = cfg["B"], cfg["S"], cfg["D"], cfg["F"], cfg["P"]
    n = b * s * s
    gen = torch.Generator(device=device).manual_seed(0)

    def unit(*shape: int) -> torch.Tensor:
        return F.normalize(torch.randn(*shape, generator=gen, device=device), dim=1)

    z0, z_lhp0 = unit(n, d), unit(n, d)
    rest = (unit(n, f), unit(n, d), unit(p, f), unit(p, d))
    common = dict(num_images=b, tau=args.tau, lam=args.lam)
    if args.impl == "hpseg":

        def loss_fn(z: torch.Tensor, z_lhp: torch.Tensor, rho: float) -> torch.Tensor:
            return hidden_positive_loss(z, z_lhp, *rest, rho=rho, chunk_images=args.chunk_images, **common)
    else:

        def loss_fn(z: torch.Tensor, z_lhp: torch.Tensor, rho: float) -> torch.Tensor:
            return reference_hidden_positive_loss(z, z_lhp, *rest, rho=rho, **common)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    def step() -> float:
        z = z0.clone().requires_grad_(True)
        z_lhp = z_lhp0.clone().requires_grad_(True)
        sync()
        t0 = time.perf_counter()
        loss = loss_fn(z, z_lhp, args.rho)
        loss.backward()
        sync()
        elapsed = time.perf_counter() - t0
        if not (torch.isfinite(loss) and torch.isfinite(z.grad).all() and torch.isfinite(z_lhp.grad).all()):
            raise FloatingPointError("non-finite loss or gradient")
        return elapsed

    def prime() -> None:
        """A tiny forward + backward so that lazy initialisation (kernels, thread pools, BLAS
        workspaces) is not counted as the loss's memory."""
        tiny = [x[: 4 * 4] for x in (z0, z_lhp0, rest[0], rest[1])]
        zt, zlt = (x.clone().requires_grad_(True) for x in tiny[:2])
        fn = hidden_positive_loss if args.impl == "hpseg" else reference_hidden_positive_loss
        fn(
            zt,
            zlt,
            tiny[2],
            tiny[3],
            rest[2],
            rest[3],
            num_images=4,
            tau=args.tau,
            lam=args.lam,
            rho=args.rho,
        ).backward()
        sync()

    out: dict[str, Any] = {"impl": args.impl}
    try:
        prime()
        if args.measure == "memory":  # CPU: one step in a process whose allocator returns freed memory
            rss_before = _rss_mb()  # inputs allocated, nothing of the loss yet
            step()
            out["peak_mem_mb"] = max(0.0, _peak_rss_mb() - rss_before)
            out["rss_before_mb"] = rss_before
            return out
        if device.type == "cuda":
            base = torch.cuda.memory_allocated(device)
            torch.cuda.reset_peak_memory_stats(device)
        for _ in range(args.warmup):
            step()
        times = [step() for _ in range(args.repeats)]
        if device.type == "cuda":
            out["peak_mem_mb"] = (torch.cuda.max_memory_allocated(device) - base) / 2**20
        with torch.no_grad():
            out["loss_rho1"] = float(loss_fn(z0, z_lhp0, 1.0))
        out.update(
            times_s=times,
            mean_s=statistics.fmean(times),
            median_s=statistics.median(times),
            min_s=min(times),
        )
    except (RuntimeError, FloatingPointError, MemoryError) as exc:  # OOM included
        out["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
    return out


# ------------------------------------------------------------------------------------------
# driver
# ------------------------------------------------------------------------------------------


def _run_child(args: argparse.Namespace, impl: str, measure: str = "time") -> dict[str, Any]:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", impl, "--measure", measure]
    for key in ("scale", "device", "repeats", "warmup", "tau", "lam", "rho", "chunk_images", "threads"):
        value = getattr(args, key)
        if value is not None:
            cmd += [f"--{key.replace('_', '-')}", str(value)]
    env = dict(os.environ)
    if measure == "memory":
        # glibc: serve every allocation ≥ 128 KiB by mmap and unmap it on free, so that the
        # resident size follows live memory rather than the allocator's adaptive caching (this
        # slows allocation down, which is why timing runs in another process)
        env.update(MALLOC_MMAP_THRESHOLD_="131072", MALLOC_TRIM_THRESHOLD_="131072")
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False, env=env)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        return {"impl": impl, "error": f"{measure} worker exited with {proc.returncode}: {' | '.join(tail)}"}
    return json.loads(lines[-1])


def _run_impl(args: argparse.Namespace, impl: str) -> dict[str, Any]:
    result = _run_child(args, impl, "time")
    if args.device == "cpu" and "error" not in result:
        memory = _run_child(args, impl, "memory")
        if "error" in memory:
            result["peak_mem_error"] = memory["error"]
        else:
            result["peak_mem_mb"] = memory["peak_mem_mb"]
    return result


def _machine(device: str) -> dict[str, Any]:
    import torch

    info: dict[str, Any] = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu": _cpu_name(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
    }
    if device == "cuda" and torch.cuda.is_available():
        info["device_name"] = torch.cuda.get_device_name(0)
        info["cuda"] = torch.version.cuda
    else:
        info["device_name"] = "cpu"
    return info


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scale", choices=sorted(SCALES), default="cpu")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--tau", type=float, default=0.8)
    parser.add_argument("--lam", type=float, default=0.5)
    parser.add_argument("--rho", type=float, default=0.02)
    parser.add_argument("--chunk-images", type=int, default=8)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--skip-reference", action="store_true", help="time hpseg only")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    parser.add_argument("--worker", choices=["hpseg", "reference"], help=argparse.SUPPRESS)
    parser.add_argument("--measure", choices=["time", "memory"], default="time", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.worker:
        print(json.dumps(_worker(args.__class__(**{**vars(args), "impl": args.worker}))))
        return 0

    if args.scale == "paper" and args.device == "cpu" and not args.skip_reference:
        print(
            "note: the reference keeps every image's (S², N) blocks for backward; at paper scale on "
            "CPU that is tens of GiB (use --skip-reference if it does not fit)",
            file=sys.stderr,
        )
    cfg = SCALES[args.scale]
    settings = {
        **cfg,
        "N": cfg["B"] * cfg["S"] ** 2,
        "scale": args.scale,
        "device": args.device,
        "tau": args.tau,
        "lam": args.lam,
        "rho": args.rho,
        "chunk_images": args.chunk_images,
        "repeats": args.repeats,
        "warmup": args.warmup,
        "products": "float16 (hpseg) / float16 autocast (reference)" if args.device == "cuda" else "float32",
        "timed": "forward + backward, wall clock",
        "peak_mem_method": (
            "torch.cuda.max_memory_allocated minus inputs, per child process"
            if args.device == "cuda"
            else "ru_maxrss minus RSS before one forward+backward, in a separate child process whose "
            "glibc malloc unmaps freed blocks >= 128 KiB (process level: live tensors + allocator overhead)"
        ),
    }
    results = {"hpseg": _run_impl(args, "hpseg")}
    if not args.skip_reference:
        results["reference"] = _run_impl(args, "reference")
    report: dict[str, Any] = {"machine": _machine(args.device), "settings": settings, "results": results}
    ours, theirs = results["hpseg"], results.get("reference", {})
    if "median_s" in ours and "median_s" in theirs:
        report["speedup_median"] = theirs["median_s"] / ours["median_s"]
        report["speedup_mean"] = theirs["mean_s"] / ours["mean_s"]
    if "loss_rho1" in ours and "loss_rho1" in theirs:
        report["loss_rho1_rel_diff"] = abs(ours["loss_rho1"] - theirs["loss_rho1"]) / abs(theirs["loss_rho1"])

    m, st = report["machine"], settings
    print(
        f"machine: {m['cpu']} ({m['cpu_count']} cores, {m['torch_threads']} torch threads), "
        f"device {m['device_name']}, torch {m['torch']}, {m['platform']}"
    )
    print(
        f"problem: scale={st['scale']} B={st['B']} S={st['S']} N={st['N']} D={st['D']} F={st['F']} "
        f"P={st['P']} tau={st['tau']} lam={st['lam']} rho={st['rho']} chunk_images={st['chunk_images']}"
    )
    for name, r in results.items():
        if "error" in r:
            print(f"  {name:9s} ERROR {r['error']}")
            continue
        print(
            f"  {name:9s} mean {r['mean_s'] * 1e3:9.1f} ms  median {r['median_s'] * 1e3:9.1f} ms  "
            f"min {r['min_s'] * 1e3:9.1f} ms  peak mem {r.get('peak_mem_mb', float('nan')):9.1f} MiB  loss(rho=1) {r['loss_rho1']:.6f}"
        )
    if "speedup_median" in report:
        print(
            f"  speedup (reference / hpseg): median {report['speedup_median']:.2f}x, "
            f"mean {report['speedup_mean']:.2f}x; loss(rho=1) rel. diff {report['loss_rho1_rel_diff']:.2e}"
        )
    print(f"  peak memory: {settings['peak_mem_method']}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return 0 if all("error" not in r for r in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
