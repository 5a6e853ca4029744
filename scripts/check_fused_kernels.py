"""Compile the fused loss's Triton kernels for a GPU architecture without a GPU and report their
registers and spills (``loss.path=fused``, hpseg/hidden_positives/fused.py).

    python scripts/check_fused_kernels.py            # sm_90 (H100/H200), the default tiles
    python scripts/check_fused_kernels.py --arch 80  # sm_80 (A100)

Triton lowers each kernel to PTX and runs the ptxas bundled with it; no device is needed. Every
variant the loss launches is compiled (operand dtype × task-specific term × kept-negative mode ×
stored bits). Exit status 1 when a variant fails to compile or, with ``--no-spills``, spills.
"""

from __future__ import annotations

import argparse
import itertools
import os
import subprocess
import sys
import tempfile
from pathlib import Path

os.environ.pop("TRITON_INTERPRET", None)  # compile for the GPU, not the interpreter

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from hpseg.hidden_positives import fused, fused_kernels  # noqa: E402

CUOBJDUMP = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
_PER_ROW = dict(n="i32", row_start="i32", row_end="i32", n_words="i32", lam="fp32", tau="fp32")


def _usage(cubin: bytes) -> str:
    """``REG:… STACK:…`` of a cubin (STACK > 0: registers spilled to local memory)."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as handle:
        handle.write(cubin)
        handle.flush()
        out = subprocess.run([str(CUOBJDUMP), "--dump-resource-usage", handle.name], capture_output=True,
                             text=True, check=True).stdout
    line = next(x for x in out.splitlines() if "REG:" in x)
    return " ".join(x for x in line.split() if x.startswith(("REG:", "STACK:")))


def _compile(fn: object, signature: dict[str, str], constants: dict[str, object], warps: int, arch: int) -> str:
    names = fn.arg_names  # type: ignore[attr-defined]
    full = {name: signature.get(name, "constexpr") for name in names}
    kernel = triton.compile(ASTSource(fn, full, constants), target=GPUTarget("cuda", arch, 32),
                            options={"num_warps": warps})
    return _usage(kernel.asm["cubin"])


def _variants(tiles: fused.FusedTiles) -> list[tuple[object, dict[str, str], dict[str, object], int]]:
    out: list[tuple[object, dict[str, str], dict[str, object], int]] = []
    negatives = dict(table_ptr="*i64", table_len="i32", key="u64", log_q="fp64", first_image="i32", count="i32",
                     longest="i32", n_blocks="i32")
    out.append((fused_kernels.negative_block_sums_kernel, dict(sums_ptr="*i64", **negatives),
                {"BLOCK": tiles.draws}, 4))
    out.append((fused_kernels.negative_bits_kernel, dict(bits_ptr="*i32", offsets_ptr="*i64", per_image="i32",
                                                         **negatives, **{k: "i32" for k in ("n", "row_start",
                                                                                            "n_words")}),
                {"BLOCK": tiles.draws}, 4))
    for dtype, with_t, keep_mode, store in itertools.product(("fp16", "bf16", "fp32"), (False, True), (0, 1, 2),
                                                            (False, True)):
        rows = {f"{x}_ptr": f"*{dtype}" for x in ("f", "s", "z", "h")}
        rows.update({f"{x}_ptr": "*fp32" for x in ("r_ag", "r_sp", "sums", "lse")})
        rows.update({f"{x}_ptr": "*i32" for x in ("keep", "a_bits", "t_bits", "counts")})
        rows.update(width_f="i32", width_s="i32", width_e="i32", **_PER_ROW)
        out.append((fused_kernels.rows_kernel, rows,
                    dict(WITH_T=with_t, KEEP_MODE=keep_mode, STORE_BITS=store, BLOCK_M=tiles.rows,
                         BLOCK_N=tiles.cols, BLOCK_K=tiles.depth), tiles.warps))
        if store:
            grad = dict(e_ptr=f"*{dtype}", width_e="i32", **_PER_ROW)
            grad.update({f"{x}_ptr": "*fp32" for x in ("out", "coef", "weight_sum", "lse")})
            grad.update({f"{x}_ptr": "*i32" for x in ("a_bits", "t_bits", "keep")})
            out.append((fused_kernels.gradient_kernel, grad,
                        dict(WITH_T=with_t, KEEP_MODE=keep_mode, BLOCK_M=tiles.grad_rows, BLOCK_N=tiles.grad_cols,
                             BLOCK_K=tiles.depth, BLOCK_D=512), tiles.grad_warps))
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", type=int, default=90, help="compute capability ×10 (90: H100/H200)")
    parser.add_argument("--no-spills", action="store_true", help="fail when a variant spills registers")
    args = parser.parse_args()
    failed = 0
    for fn, signature, constants, warps in _variants(fused.GPU_TILES):
        name = fn.__name__  # type: ignore[attr-defined]
        label = f"{name} {signature.get('f_ptr', signature.get('e_ptr', ''))} " + " ".join(
            f"{k}={v}" for k, v in constants.items() if not k.startswith("BLOCK_"))
        try:
            usage = _compile(fn, signature, constants, warps, args.arch)
        except Exception as error:  # report every variant, then fail
            print(f"FAILED {label}: {error!r}"[:400])
            failed += 1
            continue
        spills = not usage.endswith("STACK:0")
        failed += int(spills and args.no_spills)
        print(f"{'spills' if spills else 'ok':6s} {label}: {usage}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
