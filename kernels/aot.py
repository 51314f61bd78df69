"""Ahead-of-time compilation of every kernel variant for a GPU target, on a machine with no GPU and no driver.

Triton's frontend, LLVM and its bundled ``ptxas`` run on the CPU: ``triton.compile(ASTSource(fn, signature,
constexprs), target=GPUTarget("cuda", 90, 32))`` yields PTX and a cubin. For each variant (from the kernel modules'
``aot_variants()``) this records registers, spills (from ``ptxas -v``), shared memory (``metadata.shared``) and
tensor-core instructions in the PTX (``wgmma`` on sm_90, ``mma.sync`` on sm_80), and checks them:

- no compile error, no register spill;
- shared memory within the target's opt-in limit (sm_90 227 KB = 232448 B, sm_80 163 KB = 166912 B);
- sm_90 bf16/fp16 (and opt-in TF32) conv kernels use ``wgmma``; sm_80 ones ``mma.sync``;
- variants marked ``single_k_loop`` (the tensor-core convs) have all their MMAs in one PTX loop (:func:`mma_loops`:
  a nested tap/channel loop shows 2), and on sm_90 that loop waits on its async copies once per iteration
  (``cp.async.wait_group``, or an mbarrier wait for TMA): one software-pipelined K loop that never drains.

``--only conv`` (comma-separated substrings of kernel names) compiles a subset; variants with ``archs`` set (the
sm_90-only Hopper tiles) are compiled for those archs only.

The kernels must be imported with ``TRITON_INTERPRET=0`` (under the interpreter ``@triton.jit`` gives an
InterpretedFunction, which cannot be compiled), so this runs as its own process::

    TRITON_INTERPRET=0 python -m kernels.aot --arch 90,80 --jobs 2 --json out.json --md bench/results/aot-compile.md

(tests/test_aot_compile.py does exactly that). Works with Triton 3.3 through 3.9 (``ASTSource`` with name-keyed
signature/constexprs and ``"constexpr"`` signature entries); older versions are refused with a message.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import re
import subprocess
import sys
import tempfile
import time

from .tiles import Variant  # noqa: F401 (the variant record; kernels.aot.Variant stays importable)

SHARED_LIMIT = {90: 232448, 80: 166912}  # bytes of shared memory per block (opt-in maximum)
MIN_TRITON = (3, 3)
MODULES = ("kernels.conv", "kernels.bn_relu", "kernels.bn_stats")


def triton_version() -> tuple[int, int]:
    import triton

    return tuple(int(v) for v in re.findall(r"\d+", triton.__version__)[:2])


def _full_signature(v: Variant) -> tuple[dict, dict]:
    names = list(v.fn.arg_names)
    missing = [n for n in names if n not in v.signature and n not in v.constexprs]
    if missing:
        raise ValueError(f"{v.name}: no type or value for {missing}")
    sig = {n: (v.signature[n] if n in v.signature else "constexpr") for n in names}
    attrs = {
        (i,): [["tt.divisibility", 16]]
        for i, n in enumerate(names)
        if n in v.signature and (v.signature[n].startswith("*") or n in v.divisible)
    }
    return sig, attrs


def _ptxas_info(log: str) -> tuple[int | None, int | None]:
    regs = re.findall(r"Used (\d+) registers", log)
    spill = [int(a) + int(b) for a, b in re.findall(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)]
    return (int(regs[-1]) if regs else None), (max(spill) if spill else None)


def _run_ptxas(ptx: str, arch: int) -> str:
    """``ptxas -v`` on the PTX with Triton's bundled ptxas (fallback when the compile log was not captured)."""
    from triton import knobs

    ptxas = knobs.nvidia.ptxas.path
    gpu = f"sm_{arch}a" if arch >= 90 else f"sm_{arch}"
    with tempfile.TemporaryDirectory() as d:
        src = os.path.join(d, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        r = subprocess.run(
            [ptxas, "-v", f"--gpu-name={gpu}", src, "-o", os.path.join(d, "k.o")], capture_output=True, text=True
        )
        return r.stdout + r.stderr


_LABEL = re.compile(r"^(\$L__BB\d+_\d+):", re.M)
_BRANCH = re.compile(r"\bbra(?:\.uni)?\s+(\$L__BB\d+_\d+);")
_MMA = re.compile(r"\b(?:wgmma\.mma_async|mma\.sync)\b")
_WAITS = {
    "cp.async.wait": r"\bcp\.async\.wait_(?:group|all)\b",
    "bulk.wait": r"\bcp\.async\.bulk\.wait_group\b",
    "mbarrier.wait": r"\bmbarrier\.(?:try_)?wait",
    "wgmma.wait": r"\bwgmma\.wait_group\b",
    "bar.sync": r"\bbar\.sync\b",
}


def _loop_bodies(ptx: str):
    """(label, body) of every PTX loop: the text from a label to a later branch back to it."""
    labels = {m.group(1): m.start() for m in _LABEL.finditer(ptx)}
    for m in _BRANCH.finditer(ptx):
        start = labels.get(m.group(1))
        if start is not None and start <= m.start():
            yield m.group(1), ptx[start : m.end()]


def mma_loops(ptx: str) -> list[dict]:
    """The loops of a PTX kernel that contain a tensor-core MMA, each with its waits per iteration.

    A loop is the text from a label to a later branch back to it (LLVM emits natural loops that way); nested
    loops both count, so a tap loop around a channel loop gives 2 and one flat K loop gives 1. Per loop: the
    number of MMA instructions and of each wait kind in its body (``cp.async.wait`` is the software pipeline's
    async-copy wait; TMA would show ``mbarrier.wait``)."""
    out = []
    for label, body in _loop_bodies(ptx):
        n_mma = len(_MMA.findall(body))
        if n_mma:
            out.append(dict(label=label, mma=n_mma, **{k: len(re.findall(rx, body)) for k, rx in _WAITS.items()}))
    return out


def streaming_loops(ptx: str) -> list[dict]:
    """The PTX loops that load global memory through L1 (plain ``ld.global``, not the ``.cg`` loads of a
    finalising program's merge), each with its ``bar.sync`` count."""
    out = []
    for label, body in _loop_bodies(ptx):
        loads = len(re.findall(r"\bld\.global(?!\.cg)(?:\.[a-z0-9]+)*\s", body))
        if loads:
            out.append(dict(label=label, loads=loads, barriers=len(re.findall(r"\bbar\.sync\b", body))))
    return out


def compile_variant(v: Variant, arch: int) -> dict:
    """Compile ``v`` for sm_``arch``; a dict row for the table with ``problems`` (empty when it passes)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    row = dict(
        kernel=v.kernel or v.name,
        fn=v.name,
        dtypes=v.dtypes,
        config=v.config,
        arch=arch,
        regs=None,
        spills=None,
        shared=None,
        mma=None,
        loops=None,
        seconds=None,
        problems=[],
    )
    t0 = time.time()
    try:
        sig, attrs = _full_signature(v)
        src = ASTSource(fn=v.fn, signature=sig, constexprs=dict(v.constexprs), attrs=attrs)
        out = io.StringIO()
        with contextlib.redirect_stdout(out):  # TRITON_DUMP_PTXAS_LOG=1 prints `ptxas -v` here
            ck = triton.compile(
                src, target=GPUTarget("cuda", arch, 32), options={"num_warps": v.num_warps, "num_stages": v.num_stages}
            )
    except Exception as e:  # noqa: BLE001 - every compile failure is a finding for the table
        msg = " ".join(str(e).split())
        row["problems"].append(f"compile error: {type(e).__name__}: {msg[:300]}")
        row["seconds"] = round(time.time() - t0, 2)
        return row
    ptx = ck.asm.get("ptx", "")
    log = out.getvalue()
    regs, spills = _ptxas_info(log)
    if regs is None:
        regs, spills = _ptxas_info(_run_ptxas(ptx, arch))
    row["regs"], row["spills"] = regs, spills
    row["shared"] = int(ck.metadata.shared)
    wgmma = len(re.findall(r"\bwgmma\.mma_async", ptx))
    mma = len(re.findall(r"\bmma\.sync", ptx))
    row["mma"] = f"{wgmma} wgmma" if wgmma else (f"{mma} mma" if mma else "0")
    if regs is None:
        row["problems"].append("no ptxas register report")
    if spills:
        row["problems"].append(f"{spills} bytes of register spills")
    if row["shared"] > SHARED_LIMIT.get(arch, SHARED_LIMIT[80]):
        row["problems"].append(f"shared memory {row['shared']} B over the sm_{arch} limit {SHARED_LIMIT[arch]} B")
    if v.tensor_cores and arch >= 90 and not wgmma:
        row["problems"].append("sm_90 tensor-core kernel without wgmma in its PTX")
    if v.tensor_cores and arch < 90 and not mma:
        row["problems"].append(f"sm_{arch} tensor-core kernel without mma.sync in its PTX")
    loops = mma_loops(ptx)
    row["loops"] = (
        "; ".join(f"{lp['mma']} mma, " + ", ".join(f"{lp[k]} {k}" for k in _WAITS if lp[k]) for lp in loops) or "none"
    )
    if v.single_k_loop and (wgmma or mma):
        if len(loops) != 1:
            row["problems"].append(f"{len(loops)} loops hold MMAs (one pipelined K loop expected)")
        elif arch >= 90 and (
            loops[0]["mbarrier.wait"] not in ((1, 2) if v.tma == 2 else (v.tma,))
            or loops[0]["cp.async.wait"] not in ((0, 1) if v.tma == 2 else (1,))
        ):
            # sm_90 only: on sm_80 Triton's mma.sync pipeline waits once per operand stream (3 in our loops).
            # Per iteration one cp.async wait for the cp.async-loaded operand and one mbarrier wait per TMA operand
            # (nothing drains). Both operands by TMA: the copies share one barrier when both feed the MMA directly
            # (plain), two when the activation goes through the BN prologue (plus the prologue vectors' cp.async)
            row["problems"].append(
                f"K loop with {loops[0]['cp.async.wait']} cp.async and "
                f"{loops[0]['mbarrier.wait']} mbarrier waits per iteration "
                f"({'0-1 and 1-2' if v.tma == 2 else f'1 and {v.tma}'} expected)"
            )
    if v.tma and arch >= 90 and not re.search(r"\bcp\.async\.bulk\.tensor\b", ptx):
        row["problems"].append("TMA variant without cp.async.bulk.tensor in its PTX")
    if v.barrier_free_loop:
        streams = streaming_loops(ptx)
        if not any(lp["barriers"] == 0 for lp in streams):
            row["problems"].append(f"no barrier-free streaming loop (loops: {streams})")
    if v.vector_loads and not re.search(r"\bld\.global(?:\.[a-z0-9]+)*\.v[24]\.", ptx):
        row["problems"].append("data loads are scalar (no ld.global.v2/.v4)")
    row["seconds"] = round(time.time() - t0, 2)
    return row


def collect_variants(modules=MODULES) -> list[Variant]:
    import importlib

    out = []
    for name in modules:
        mod = importlib.import_module(name)
        if hasattr(mod, "aot_variants"):
            out += list(mod.aot_variants())
    return out


_VARIANTS: list[Variant] = []


def _work(job: tuple[int, int]) -> dict:
    i, arch = job
    return compile_variant(_VARIANTS[i], arch)


def compile_all(
    archs=(90, 80), jobs: int = 2, modules=MODULES, limit: int | None = None, only: str | None = None
) -> list[dict]:
    """Compile every variant of ``modules`` for each arch (``jobs`` processes); rows in a fixed order.

    ``only``: comma-separated substrings; a variant is kept when its label ``"<kernel> <dtypes> <config>"``
    (``"conv_dgrad x=bf16 op=bf16 bn 64x64x32 g8 w8 s3"``) or its function name contains one of them
    (``"conv"``: the convolutions only)."""
    global _VARIANTS
    _VARIANTS = collect_variants(modules)
    if only:
        keys = [k for k in only.split(",") if k]
        _VARIANTS = [v for v in _VARIANTS if any(k in f"{v.kernel} {v.dtypes} {v.config}" or k in v.name for k in keys)]
    if limit:
        _VARIANTS = _VARIANTS[:limit]
    work = [(i, a) for a in archs for i in range(len(_VARIANTS)) if not _VARIANTS[i].archs or a in _VARIANTS[i].archs]
    if jobs <= 1:
        return [_work(j) for j in work]
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(jobs, mp_context=mp.get_context("fork")) as pool:
        return list(pool.map(_work, work, chunksize=4))


def table(rows: list[dict]) -> str:
    head = (
        "| arch | kernel | dtypes | config | regs | spills | shared B | tensor-core instrs | "
        "loops with MMA: per-iteration MMAs and waits | status |"
    )
    lines = [head, "|" + "---|" * 10]
    for r in rows:
        status = "ok" if not r["problems"] else "FAIL: " + "; ".join(r["problems"])
        lines.append(
            f"| sm_{r['arch']} | {r['kernel']} | {r['dtypes']} | {r['config']} | {r['regs']} | "
            f"{r['spills']} | {r['shared']} | {r['mma']} | {r.get('loops') or ''} | {status} |"
        )
    return "\n".join(lines)


def summary(rows: list[dict]) -> str:
    import triton

    failed = [r for r in rows if r["problems"]]
    per_arch = {}
    for r in rows:
        per_arch.setdefault(r["arch"], [0, 0])
        per_arch[r["arch"]][0] += 1
        per_arch[r["arch"]][1] += not r["problems"]
    parts = ", ".join(f"sm_{a}: {ok}/{n} ok" for a, (n, ok) in sorted(per_arch.items(), reverse=True))
    shared = max((r["shared"] or 0) for r in rows) if rows else 0
    regs = max((r["regs"] or 0) for r in rows) if rows else 0
    return (
        f"Triton {triton.__version__}: {len(rows)} compiles ({parts}); {len(failed)} failed; "
        f"max registers {regs}, max shared memory {shared} B"
    )


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", default="90,80", help="comma-separated compute capabilities (default 90,80)")
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--modules", default=",".join(MODULES))
    ap.add_argument("--limit", type=int, default=None, help="only the first N variants (debugging)")
    ap.add_argument(
        "--only",
        default=None,
        help="comma-separated substrings of '<kernel> <dtypes> <config>' to keep (e.g. conv, conv_dgrad, "
        "'conv_fprop x=bf16 op=bf16 bn')",
    )
    ap.add_argument("--json", default=None, help="write the rows as JSON here")
    ap.add_argument("--md", default=None, help="write the markdown table here")
    args = ap.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        print("kernels.aot: run with TRITON_INTERPRET=0 (interpreted kernels cannot be compiled)", file=sys.stderr)
        return 2
    if triton_version() < MIN_TRITON:
        print(
            f"kernels.aot: needs Triton >= {'.'.join(map(str, MIN_TRITON))} (ASTSource with name-keyed "
            f"constexprs); this is {'.'.join(map(str, triton_version()))}",
            file=sys.stderr,
        )
        return 3
    t0 = time.time()
    rows = compile_all(
        tuple(int(a) for a in args.arch.split(",")), args.jobs, tuple(args.modules.split(",")), args.limit, args.only
    )
    if not rows:
        print(f"kernels.aot: no variant matches --only {args.only!r}", file=sys.stderr)
        return 2
    text = summary(rows) + f" in {time.time() - t0:.0f} s on {args.jobs} processes\n\n" + table(rows) + "\n"
    print(text)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    if args.md:
        os.makedirs(os.path.dirname(os.path.abspath(args.md)), exist_ok=True)
        with open(args.md, "w") as f:
            f.write(
                "# Ahead-of-time compile check (no GPU)\n\n"
                "Generated by `tests/test_aot_compile.py` (`python -m kernels.aot`): every kernel variant the "
                "CUDA launchers can choose, compiled for sm_90 and sm_80 on CPU; registers and spills from "
                "`ptxas -v`, shared memory from the compiled metadata, tensor-core instructions counted in the "
                "PTX.\n\n" + text
            )
    return 1 if any(r["problems"] for r in rows) else 0


if __name__ == "__main__":
    os.environ.setdefault("TRITON_DUMP_PTXAS_LOG", "1")
    sys.exit(main())
