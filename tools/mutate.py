"""On-demand mutation check (not part of CI): small deliberate bugs, each run against the tests that should catch it.

    PYTHONPATH=. python tools/mutate.py --list                      # the mutants, and whether their anchor is found
    PYTHONPATH=. python tools/mutate.py --files recipes,losses      # run the mutants of these files (name fragments)
    PYTHONPATH=. python tools/mutate.py --ids losses-kth-minus-1    # run some mutants by id
    PYTHONPATH=. python tools/mutate.py --json out.json --timeout 300

Each mutant is one exact text replacement, anchored on a short code snippet of one file. The working tree is never
touched: its files (tracked and untracked-not-ignored) are copied once into a temporary directory, the mutant is
written there, ``python -m pytest -x -q`` runs the mutant's test selection in that copy, and the file is restored
before the next mutant. Outcomes:

  killed      the selection failed (rc 1), or timed out (``--timeout``, default 600 s per mutant)
  SURVIVED    the selection passed: a test gap, unless the mutant is listed as ``equivalent`` (explained below it)
  stale       the anchor is not in the file (the code moved on): update or drop the mutant; nothing is run
  ambiguous   the anchor occurs more than once: make it longer; nothing is run
  error       pytest could not run the selection (rc 2-5, e.g. nothing collected)

The unmutated selection runs first (once per distinct selection, ``--no-baseline`` skips it): if it fails, its
mutants are reported ``baseline-failed`` instead of being run. Exit status 1 if a non-equivalent mutant survived.

Adding a mutant: append a ``Mutant`` to ``MUTANTS`` with the smallest anchor that is unique in its file; keep it
a plausible bug (an off-by-one, a dropped term, a swapped comparison), and name the tests that should kill it
(``-k`` expressions keep the interpreted kernel selections short). The BN kernel files change often: their mutants
are anchored on one statement each so that a rewrite makes them ``stale``, not wrong.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Mutant:
    id: str
    file: str
    anchor: str  # exact text, must occur once in ``file``
    replace: str
    tests: tuple[str, ...]  # pytest arguments: files, node ids, "-k", "expr"
    why: str = ""  # the bug it models
    equivalent: str = ""  # non-empty: why no test can kill it (the program's behaviour is unchanged)


def _m(id, file, anchor, replace, tests, why="", equivalent=""):
    return Mutant(id, file, anchor, replace, tuple(tests), why, equivalent)


RECIPES, LOSSES = "data_pipes/recipes.py", "widedeep/train/losses.py"
BN_STATS, BN_RELU, CONV = "kernels/bn_stats.py", "kernels/bn_relu.py", "kernels/conv.py"
T_RECIPES = ["tests/test_recipes.py"]
T_LOSSES = ["tests/test_losses.py"]
T_BN = ["tests/test_bn_relu_kernels.py"]
T_CONV = ["tests/test_conv_kernels.py"]

MUTANTS: list[Mutant] = [
    # ---- data_pipes/recipes.py: the seed's augmentation parameters
    _m(
        "recipes-seg-x0-plus-1",
        RECIPES,
        "return int(rng.integers(0, high)) - margin",
        "return int(rng.integers(0, high)) - margin + 1",
        T_RECIPES,
        "segmentation window shifted by one pixel",
    ),
    _m(
        "recipes-seg-target-top-excluded",
        RECIPES,
        "int(hi * self.origin_size) + 1",
        "int(hi * self.origin_size)",
        T_RECIPES,
        "largest target size never drawn",
    ),
    _m(
        "recipes-seg-side-rounded",
        RECIPES,
        "side = max(1, int(self.crop / rate))",
        "side = max(1, int(round(self.crop / rate)))",
        T_RECIPES,
        "window side rounded instead of truncated",
    ),
    _m(
        "recipes-seg-margin-rounded",
        RECIPES,
        "margin = max(1, int(FEATURE_STRIDE / rate / 2))",
        "margin = max(1, int(round(FEATURE_STRIDE / rate / 2)))",
        T_RECIPES,
        "canvas margin d0 rounded",
    ),
    _m(
        "recipes-seg-jitter-plus-1",
        RECIPES,
        "high = max(1, int(FEATURE_STRIDE / rate), ",
        "high = max(1, int(FEATURE_STRIDE / rate) + 1, ",
        T_RECIPES,
        "small-image jitter range one too wide",
    ),
    _m(
        "recipes-seg-old-small-image-rule",
        RECIPES,
        "return int(rng.integers(0, high)) - margin",
        "return (int(rng.integers(-margin, extent - side + 1)) if extent >= side else "
        "-int(rng.integers(0, max(1, int(FEATURE_STRIDE / rate)))))",
        T_RECIPES,
        "the pre-#25 rule: a window larger than the image started d0 px left of the seed's",
    ),
    _m(
        "recipes-seg-flip-inverted",
        RECIPES,
        '"window": (x0, y0, side, side), "flip": bool(self.flip and rng.random() < 0.5)',
        '"window": (x0, y0, side, side), "flip": bool(self.flip and rng.random() >= 0.5)',
        T_RECIPES,
        "flip decision inverted",
    ),
    _m(
        "recipes-seg-crop-rounded-down",
        RECIPES,
        "-(-self.crop // FEATURE_STRIDE) * FEATURE_STRIDE",
        "(self.crop // FEATURE_STRIDE) * FEATURE_STRIDE",
        T_RECIPES,
        "crop 500 -> 496 instead of 504",
    ),
    _m(
        "recipes-cls-x-exclusive",
        RECIPES,
        "rng.integers(0, width - w + 1)",
        "rng.integers(0, width - w)",
        T_RECIPES,
        "random-resized-crop never touches the right edge",
    ),
    _m(
        "recipes-cls-fit-strict",
        RECIPES,
        "0 < w <= width and 0 < h <= height",
        "0 < w < width and 0 < h <= height",
        T_RECIPES,
        "a full-width window is refused",
    ),
    _m(
        "recipes-cls-no-swap",
        RECIPES,
        "if rng.random() < 0.5:\n                w, h = h, w",
        "if rng.random() < 0.0:\n                w, h = h, w",
        T_RECIPES,
        "aspect never swapped",
    ),
    _m(
        "recipes-cls-fallback-left",
        RECIPES,
        "((width - s) // 2, (height - s) // 2, s, s)",
        "(0, (height - s) // 2, s, s)",
        T_RECIPES,
        "fallback crop not centred",
    ),
    _m(
        "recipes-cls-area-bounds",
        RECIPES,
        "area: tuple[float, float] = (0.08, 1.0)",
        "area: tuple[float, float] = (0.1, 1.0)",
        T_RECIPES,
        "area fraction bounds",
    ),
    _m(
        "recipes-cls-ratio-bounds",
        RECIPES,
        "ratio: tuple[float, float] = (3 / 4, 4 / 3)",
        "ratio: tuple[float, float] = (2 / 3, 3 / 2)",
        T_RECIPES,
        "aspect bounds",
    ),
    _m(
        "recipes-stream-order",
        RECIPES,
        "[seed & 0xFFFFFFFF, epoch, index]",
        "[seed & 0xFFFFFFFF, index, epoch]",
        T_RECIPES,
        "per-sample stream keyed differently",
    ),
    # ---- widedeep/train/losses.py: label subsampling and OHEM
    _m(
        "losses-labels-3-mod-8",
        LOSSES,
        "label[:, stride // 2 :: stride, stride // 2 :: stride]",
        "label[:, stride // 2 - 1 :: stride, stride // 2 - 1 :: stride]",
        T_LOSSES,
        "label[3::8, 3::8]",
    ),
    _m(
        "losses-labels-columns-0",
        LOSSES,
        "stride // 2 :: stride, stride // 2 :: stride]",
        "stride // 2 :: stride, ::stride]",
        T_LOSSES,
        "columns subsampled from 0",
    ),
    _m("losses-kth-minus-1", LOSSES, "kthvalue(min_kept)", "kthvalue(min_kept - 1)", T_LOSSES, "kth index off by one"),
    _m("losses-kth-plus-1", LOSSES, "kthvalue(min_kept)", "kthvalue(min_kept + 1)", T_LOSSES, "kth index off by one"),
    _m(
        "losses-keep-strict",
        LOSSES,
        "prob <= torch.clamp",
        "prob < torch.clamp",
        T_LOSSES,
        "the k-th pixel itself dropped",
    ),
    _m(
        "losses-clamp-max",
        LOSSES,
        "torch.clamp(kth, min=thresh)",
        "torch.clamp(kth, max=thresh)",
        T_LOSSES,
        "threshold lowered instead of raised",
    ),
    _m("losses-thresh-default", LOSSES, "thresh: float = 0.6", "thresh: float = 0.7", T_LOSSES, "seed's 0.6"),
    _m("losses-min-kept-default", LOSSES, "min_kept: int = 256", "min_kept: int = 255", T_LOSSES, "seed's 256"),
    _m(
        "losses-count-all-pixels",
        LOSSES,
        "n = int(valid.sum())",
        "n = int(target.numel())",
        T_LOSSES,
        "ignored pixels counted towards min_kept",
    ),
    _m(
        "losses-mean-over-valid",
        LOSSES,
        "return nll[keep].sum(), keep.sum()",
        "return nll[keep].sum(), valid.sum()",
        T_LOSSES,
        "normalised by the valid count, not the kept count",
    ),
    _m(
        "losses-empty-no-graph",
        LOSSES,
        "    if n == 0:  # a zero",
        "    if n == 0:\n        return torch.zeros(())\n    if n == 0:  # a zero",
        T_LOSSES,
        "all-ignored batch returns a loss without a graph (backward raises)",
    ),
    _m(
        "losses-n-ge",
        LOSSES,
        "if n > min_kept:",
        "if n >= min_kept:",
        T_LOSSES,
        "",
        equivalent="with exactly min_kept valid pixels the k-th smallest is the largest, so both branches keep all",
    ),
    _m(
        "losses-kth-over-all-pixels",
        LOSSES,
        "prob[valid].kthvalue",
        "prob.flatten().kthvalue",
        T_LOSSES,
        "",
        equivalent="ignored pixels have NLL 0, so p = 1 (the largest); with more than min_kept valid pixels the "
        "k-th smallest over all pixels is a valid one",
    ),
    # ---- kernels/conv.py: implicit-GEMM convolutions (interpreted on CPU; -k keeps them short)
    _m(
        "conv-int64-idx-noop",
        CONV,
        "v = v.to(tl.int64)",
        "v = v",
        T_CONV + ["-k", "int64"],
        "INT64 variant computes offsets in int32",
    ),
    _m(
        "conv-needs-int64-strict",
        CONV,
        "return max(numels) >= INT32_LIMIT",
        "return max(numels) > INT32_LIMIT",
        T_CONV + ["-k", "int64"],
        "2**31 elements exactly stays int32",
    ),
    _m(
        "conv-dgrad-deterministic-ignored",
        CONV,
        "det = (_deterministic if deterministic is None else deterministic) and bn is not None",
        "det = False and bn is not None",
        T_CONV + ["-k", "deterministic"],
        "deterministic=True still uses atomics for the dgrad BN sums",
    ),
    _m(
        "conv-wgrad-deterministic-ignored",
        CONV,
        "det = _deterministic if deterministic is None else deterministic\n",
        "det = False\n",
        T_CONV + ["-k", "deterministic"],
        "deterministic=True still uses atomics for dW",
    ),
    _m(
        "conv-dgrad-no-reset-to-zero",
        CONV,
        '"dgrad": ["sums_ptr"]',
        '"dgrad": None',
        ["tests/test_conv_autotune.py", "-k", "autotuned"],
        "autotuning's benchmark runs accumulate into the BN sums",
    ),
    _m(
        "conv-wgrad-no-reset-to-zero",
        CONV,
        '"wgrad": ["dw_ptr"]',
        '"wgrad": None',
        ["tests/test_conv_autotune.py", "-k", "autotuned"],
        "autotuning's benchmark runs accumulate into dW",
    ),
    _m(
        "conv-tma-weight-tile-column",
        CONV,
        "w_desc.load([rs, c0, pid_n * BLOCK_N])",
        "w_desc.load([rs, c0, 0])",
        ["tests/test_conv_autotune.py", "-k", "tma_weight"],
        "the TMA weight tile ignores its column block",
    ),
    _m(
        "conv-tma-x-tile-row",
        CONV,
        "x_desc.load([pid_m * BLOCK_M, c0])",
        "x_desc.load([0, c0])",
        ["tests/test_conv_autotune.py", "-k", "tma_weight"],
        "the 1x1 TMA activation tile ignores its row block",
    ),
    _m(
        "conv-grouped-pid-n",
        CONV,
        "pid_n = (pid % width) // size_m",
        "pid_n = (pid % width) % size_m",
        T_CONV + ["-k", "gpu_tiles"],
        "grouped tile order maps two programs to one tile",
    ),
    _m(
        "conv-dgrad-sums-no-xc",
        CONV,  # the 16-bit operands' branch (the gpu_tiles cases are mostly bf16/fp16)
        "else:\n                    tl.atomic_add(sums_ptr + C + cs, tl.sum(acc * xc, axis=0), mask=c_ok)",
        "else:\n                    tl.atomic_add(sums_ptr + C + cs, tl.sum(acc, axis=0), mask=c_ok)",
        T_CONV + ["-k", "gpu_tiles"],
        "dgrad epilogue's sum g*(x-mean) loses its (x-mean)",
    ),
    # ---- the compile path: create_model(fused="triton") must reach the triton kernels under torch.compile
    _m(
        "models-explicit-fused-backend-ignored",
        "widedeep/models/resnet38.py",
        '("auto" if fused is True else str(fused))',
        '"auto"',
        ["tests/test_compile_ops.py", "-k", "compiled_fused_resnet38 and torch-triton"],
        "fused='triton' silently follows the default backend",
    ),
    # ---- bench: the campaign's GPU-test gate
    _m(
        "bench-gate-rc5-passes",
        "bench/runner.py",
        'passed = returncode == 0 and counts.get("passed", 0) > 0',
        "passed = returncode in (0, 5)",
        ["tests/test_bench.py", "-k", "gpu_gate"],
        "the pre-#25 gate: nothing selected or everything skipped counted as a pass",
    ),
    # ---- kernels/_common.py, kernels/bn_stats.py, kernels/bn_relu.py (anchors are single statements)
    _m(
        "bn-stats-no-chan-term",
        "kernels/_common.py",
        "m2_a + m2_b + delta * delta * n_a * w",
        "m2_a + m2_b",
        T_BN + ["tests/test_gpu_shaped.py"],
        "Chan's merge drops its cross-term (lanes, program partials and ranks all merge through it)",
    ),
    _m(
        "bn-stats-no-eps",
        BN_STATS,
        "rstd = 1.0 / tl.sqrt(var + eps)",
        "rstd = 1.0 / tl.sqrt(var)",
        T_BN,
        "eps dropped from rstd (only a zero-variance channel notices)",
    ),
    _m(
        "bn-stats-biased-running-var",
        BN_STATS,
        "m2 / tl.maximum(count - 1.0, 1.0)",
        "m2 / tl.maximum(count, 1.0)",
        T_BN,
        "running variance updated with the biased variance",
    ),
    _m(
        "bn-relu-finalize-assign-g",
        BN_RELU,
        "sum_g += tl.sum(tl.load(part_ptr + offs",
        "sum_g = tl.sum(tl.load(part_ptr + offs",
        T_BN,
        "gradient finalize keeps only the last block of partial sum(g)",
    ),
    _m(
        "bn-relu-finalize-assign-gx",
        BN_RELU,
        "sum_gx += tl.sum(",
        "sum_gx = tl.sum(",
        T_BN,
        "gradient finalize keeps only the last block of partial sum(g*(x-mean))",
    ),
    _m(
        "bn-relu-dgamma-doubled",
        BN_RELU,
        "tl.store(red_ptr + 2 * C + cs, sum_gx * rstd",
        "tl.store(red_ptr + 2 * C + cs, 2.0 * sum_gx * rstd",
        T_BN + ["tests/test_fused_model.py"],
        "dgamma off by a constant factor (a cosine check passes it)",
    ),
]


def _selected(args) -> list[Mutant]:
    out = MUTANTS
    if args.files:
        frags = [f.strip() for f in args.files.split(",") if f.strip()]
        out = [m for m in out if any(f in m.file for f in frags)]
    if args.ids:
        ids = {i.strip() for i in args.ids.split(",") if i.strip()}
        unknown = ids - {m.id for m in MUTANTS}
        if unknown:
            raise SystemExit(f"tools/mutate.py: unknown mutant id(s) {sorted(unknown)}; see --list")
        out = [m for m in out if m.id in ids]
    return out


def _anchor_state(m: Mutant, root: Path) -> str:
    path = root / m.file
    if not path.is_file():
        return "stale"
    n = path.read_text().count(m.anchor)
    return "ok" if n == 1 else ("stale" if n == 0 else "ambiguous")


def _copy_tree(dst: Path) -> None:
    """The working tree as git sees it (tracked + untracked-not-ignored files), without .git and ignored files."""
    files = (
        subprocess.run(
            ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
            cwd=ROOT,
            capture_output=True,
            check=True,
        )
        .stdout.decode()
        .split("\0")
    )
    for rel in filter(None, files):
        src = ROOT / rel
        if src.is_file():
            (dst / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dst / rel)


def _pytest(tree: Path, tests: tuple[str, ...], timeout: float) -> tuple[str, int | None, float, str]:
    env = dict(
        os.environ,
        PYTHONPATH=str(tree),
        OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"),
        PYTHONDONTWRITEBYTECODE="1",
    )
    cmd = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *tests]
    t = time.perf_counter()
    p = subprocess.Popen(
        cmd, cwd=tree, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )  # its own process group: a timeout ends its children too
    try:
        out, _ = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        out, _ = p.communicate()
        return "timeout", None, time.perf_counter() - t, out or ""
    return "done", p.returncode, time.perf_counter() - t, out


def _tail(out: str) -> str:
    lines = [ln for ln in out.strip().splitlines() if ln.strip()]
    fails = [ln for ln in lines if ln.startswith(("FAILED", "ERROR"))]
    return (fails[0] if fails else lines[-1] if lines else "")[:160]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(
        prog="tools/mutate.py",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("--list", action="store_true", help="list the mutants and their anchor state; run nothing")
    ap.add_argument("--files", help="comma list of file-name fragments (recipes,losses,conv,bn_stats,bn_relu)")
    ap.add_argument("--ids", help="comma list of mutant ids")
    ap.add_argument("--timeout", type=float, default=600, help="seconds per mutant (a timeout counts as killed)")
    ap.add_argument(
        "--tests",
        help="run the selected mutants against these pytest arguments instead of their own "
        "(space-separated, e.g. 'tests/test_train.py -k ohem'): which tests catch what",
    )
    ap.add_argument("--no-baseline", action="store_true", help="do not run the unmutated selections first")
    ap.add_argument("--json", type=Path, help="also write the results here")
    args = ap.parse_args(argv)
    mutants = _selected(args)
    if args.tests:
        mutants = [Mutant(**dict(asdict(m), tests=tuple(args.tests.split()))) for m in mutants]
    if args.list:
        for m in mutants:
            print(f"{_anchor_state(m, ROOT):9s} {m.id:36s} {m.file:26s} {' '.join(m.tests)}")
        return 0
    results, status = [], 0
    with tempfile.TemporaryDirectory(prefix="widedeep-mutate-") as tmp:
        tree = Path(tmp)
        _copy_tree(tree)
        baseline: dict[tuple[str, ...], bool] = {}
        for m in mutants:
            row = dict(asdict(m), tests=" ".join(m.tests))
            row.pop("anchor"), row.pop("replace")
            state = _anchor_state(m, tree)
            if state != "ok":
                row.update(outcome=state)
            else:
                if not args.no_baseline and m.tests not in baseline:
                    kind, rc, secs, out = _pytest(tree, m.tests, args.timeout)
                    baseline[m.tests] = kind == "done" and rc == 0
                    print(
                        f"baseline  {' '.join(m.tests)}: {'passed' if baseline[m.tests] else 'FAILED'} "
                        f"({secs:.0f} s) {'' if baseline[m.tests] else _tail(out)}",
                        flush=True,
                    )
                if not args.no_baseline and not baseline[m.tests]:
                    row.update(outcome="baseline-failed")
                else:
                    path = tree / m.file
                    original = path.read_text()
                    try:
                        path.write_text(original.replace(m.anchor, m.replace, 1))
                        kind, rc, secs, out = _pytest(tree, m.tests, args.timeout)
                    finally:
                        path.write_text(original)
                    outcome = (
                        "killed" if kind == "timeout" or rc == 1 else "SURVIVED" if rc == 0 else f"error (rc {rc})"
                    )
                    if outcome == "SURVIVED" and m.equivalent:
                        outcome = "survived (equivalent)"
                    elif outcome == "SURVIVED":
                        status = 1
                    row.update(
                        outcome=outcome, seconds=round(secs, 1), detail="timed out" if kind == "timeout" else _tail(out)
                    )
            results.append(row)
            print(f"{row['outcome']:22s} {m.id:36s} {row.get('seconds', ''):>6} s  {row.get('detail', '')}", flush=True)
    print(
        "\nsummary: "
        + ", ".join(f"{k} {sum(r['outcome'] == k for r in results)}" for k in sorted({r["outcome"] for r in results}))
    )
    for r in results:
        if r["outcome"].startswith("survived (equivalent"):
            print(f"  equivalent {r['id']}: {r['equivalent']}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1) + "\n")
    return status


if __name__ == "__main__":
    raise SystemExit(main())
