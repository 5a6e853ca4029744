"""``hpseg sweep-k``: one HP run per number of clusters K, each judged without labels."""

from __future__ import annotations

import argparse

from hpseg.cli.commands import overrides


def add_sweep_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``hpseg sweep-k``."""
    parser.add_argument("--k", nargs="+", type=int, required=True, metavar="K",
                        help="numbers of clusters to try, e.g. --k 4 6 8 (one run each, in RUN/k-<K>/)")
    parser.add_argument("--preset", default=None, help="preset, e.g. folder")
    parser.add_argument("overrides", nargs="*", help="config overrides key=value, as for hpseg train")


def cmd_sweep(args: argparse.Namespace) -> int:
    from hpseg.sweep import format_sweep, sweep_clusters

    result = sweep_clusters(args.preset, overrides(args), list(args.k))
    print(format_sweep(result))
    print(f"\none page with the table and every K's gallery: {result.folder / 'sweep.html'}")
    print(f"all figures: {result.folder / 'sweep.json'}; each K's report: {result.folder}/k-<K>/eval/report.html")
    chosen = (result.recommendation or {}).get("k")
    target = f"{result.folder}/k-{chosen}" if chosen else f"{result.folder}/k-<K>"
    print("check the recommendation against the galleries (do the segments match what you want?); then "
          f"hpseg name {target} 0=… 1=…")
    return 0
