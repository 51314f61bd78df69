"""Summary ratios, goal checks, the stdout/Markdown tables, the plots and the README block of a results dict."""

from __future__ import annotations

import re
from pathlib import Path

GOALS_NOTE = "goals of issues 12 and 20 (#20); judged only from numbers measured side by side in this run"
# (ours, baseline) step ratios in the summary: x/y img/s > 1 means x is faster
PAIRS = (
    ("fused", "eager"),
    ("fused", "compile"),
    ("fused", "checkpoint"),
    ("fused_graphed", "eager"),
    ("eager_graphed", "eager"),
    ("fused_graphed", "compile"),
    ("fused_graphed", "eager_graphed"),
    ("fused_compile", "eager"),
    ("fused_cudagraphs", "eager"),
    ("fused_cudagraphs", "compile"),
    ("compile", "eager"),
)


def _by(rows, model, impl):
    for r in rows:
        if (
            r.get("model") == model
            and r.get("impl") == impl
            and "error" not in r
            and "skipped" not in r
            and not r.get("oom")
        ):
            return r
    return None


def _ratio(a, b, key):
    if a is None or b is None or a.get(key) in (None, 0) or b.get(key) in (None, 0):
        return None
    return round(a[key] / b[key], 3)


def summary(res: dict) -> dict:
    """Ratios of ours (fused, graphed, compiled) against eager, torch.compile and checkpointing, per model
    (:data:`PAIRS`); the full-resolution largest batches as ratios to eager's."""
    fixed = res.get("model", {}).get("fixed", [])
    largest = res.get("model", {}).get("largest", [])
    out = {}
    for model in sorted({r.get("model") for r in fixed if r.get("model")}):
        m = {}
        for ours, base in PAIRS:
            a, b = _by(fixed, model, ours), _by(fixed, model, base)
            if a is None or b is None:
                continue
            m[f"{ours}/{base}"] = dict(
                step_time=_ratio(a, b, "step_ms") if a.get("timed") and b.get("timed") else None,
                img_per_s=_ratio(a, b, "img_per_s") if a.get("timed") and b.get("timed") else None,
                peak_memory=_ratio(a, b, "peak_bytes"),
                saved_bytes=_ratio(a, b, "saved_bytes"),
            )
            la, lb = _by(largest, model, ours), _by(largest, model, base)
            if la and lb and la.get("largest_batch") and lb.get("largest_batch"):
                m[f"{ours}/{base}"]["largest_batch"] = round(la["largest_batch"] / lb["largest_batch"], 3)
        out[model] = m
    full = [r for r in res.get("model", {}).get("fullres", []) if r.get("largest_batch")]
    if full:
        model = full[0]["model"]
        e = _by(full, model, "eager")
        out[model] = {
            r["impl"]: dict(
                largest_batch=r["largest_batch"],
                complete=r.get("complete"),
                vs_eager=round(r["largest_batch"] / e["largest_batch"], 3) if e else None,
            )
            for r in full
        }
    return out


def goals(res: dict) -> list[dict]:
    s = res.get("summary", {})
    cuda = res.get("environment", {}).get("device", "cpu") != "cpu"
    rows = []

    def add(goal, value, ok, applies=True, why=""):
        rows.append(
            dict(
                goal=goal,
                value=value,
                status=("not measured" if value is None else ("met" if ok(value) else "missed"))
                if applies
                else f"not applicable here ({why})",
            )
        )

    for model in ("A1", "A1-s8"):
        v = s.get(model, {}).get("fused/eager", {}).get("saved_bytes")
        add(f"{model} saved activation bytes fused <= 0.50x eager", v, lambda v: v <= 0.50)
    a1 = s.get("A1", {})
    why = "CPU run; the goal is for an H100, bf16"
    add("A1 img/s fused >= 1.05x eager", a1.get("fused/eager", {}).get("img_per_s"), lambda v: v >= 1.05, cuda, why)
    add(
        "A1 peak memory fused <= 0.55x eager",
        a1.get("fused/eager", {}).get("peak_memory"),
        lambda v: v <= 0.55,
        cuda,
        why,
    )
    add(
        "A1 largest batch fused >= 1.8x eager",
        a1.get("fused/eager", {}).get("largest_batch"),
        lambda v: v >= 1.8,
        cuda,
        why,
    )
    add("A1 img/s fused > torch.compile", a1.get("fused/compile", {}).get("img_per_s"), lambda v: v > 1.0, cuda, why)
    add(
        "A1 img/s fused >= 1.3x checkpoint",
        a1.get("fused/checkpoint", {}).get("img_per_s"),
        lambda v: v >= 1.3,
        cuda,
        why,
    )
    _goals_20(res, add, cuda)
    bn = [r for r in res.get("kernels", {}).get("bn_relu", []) if r.get("timed")]
    v = min((min(r.get("ours_fwd_pct_copy", 1e9), r.get("ours_bwd_pct_copy", 1e9)) for r in bn), default=None)
    add("BN-ReLU fwd/bwd >= 85% of copy bandwidth (worst shape, %)", v, lambda v: v >= 85, cuda, "CPU: smoke only")
    conv = [r for r in res.get("kernels", {}).get("conv", {}).get("rows", []) if r.get("timed") and r["k"] == 3]
    conv = sorted(conv, key=lambda r: -r.get("gflop_per_pass", 0))[:4]
    v = max((r.get("ours_fprop_pct_peak", -1) for r in conv), default=None)
    add(
        "BN-ReLU-conv 3x3 fprop >= 70% of bf16 peak on large layers (best of 4 largest, %)",
        None if v in (None, -1) else v,
        lambda v: v >= 70,
        cuda,
        "CPU: smoke only",
    )
    return rows


def _goals_20(res: dict, add, cuda: bool) -> None:
    """Issue 20: the fused path as fast as the alternatives at half the memory."""
    s = res.get("summary", {})
    why = "CPU run; the goal is for an H100, bf16"
    for model, what in (("A1-s8-frozen", "A1-s8/4 frozen BN"), ("A1-s8", "A1-s8/4 batch statistics")):
        m = s.get(model, {})
        add(
            f"#20 {what}: fused_graphed img/s >= 1.15x eager",
            m.get("fused_graphed/eager", {}).get("img_per_s"),
            lambda v: v >= 1.15,
            cuda,
            why,
        )
        add(
            f"#20 {what}: fused img/s >= 1.0x eager",
            m.get("fused/eager", {}).get("img_per_s"),
            lambda v: v >= 1.0,
            cuda,
            why,
        )
    a1 = s.get("A1", {})
    add(
        "#20 A1/64: fused img/s >= torch.compile",
        a1.get("fused/compile", {}).get("img_per_s"),
        lambda v: v >= 1.0,
        cuda,
        why,
    )
    add(
        "#20 A1/64: fused peak memory <= 0.6x eager",
        a1.get("fused/eager", {}).get("peak_memory"),
        lambda v: v <= 0.6,
        cuda,
        why,
    )
    parts = [r for r in res.get("kernels", {}).get("bn_parts", []) if r.get("timed")]
    for name in ("stats", "apply"):
        v = min((r[f"{name}_pct_copy"] for r in parts if f"{name}_pct_copy" in r), default=None)
        add(
            f"#20 BN {name} pass >= 85% of copy bandwidth (worst shape, %)",
            v,
            lambda v: v >= 85,
            cuda,
            "CPU: smoke only",
        )
    full = s.get("A1-s8-fullres", {})
    best = max((full.get(i, {}).get("largest_batch") or 0 for i in ("fused", "unit")), default=0) or None
    add(
        "#20 A1-s8 at 1024x2048: largest batch (fused or unit) >= 16 on one 80 GB GPU",
        best,
        lambda v: v >= 16,
        cuda,
        "needs CUDA",
    )


def _fmt(v, spec):
    return "-" if v is None else format(v, spec)


def model_table(res: dict, markdown: bool = False) -> str:
    fixed = res.get("model", {}).get("fixed", [])
    largest = {(r.get("model"), r.get("impl")): r for r in res.get("model", {}).get("largest", [])}
    head = [
        "model",
        "impl",
        "batch",
        "step ms",
        "img/s",
        "peak MiB",
        "saved MiB",
        "step x eager",
        "peak x eager",
        "saved x eager",
        "largest batch",
        "note",
    ]
    lines = []
    for r in fixed:
        e = _by(fixed, r.get("model"), "eager")
        lb = largest.get((r.get("model"), r.get("impl")), {})
        note = r.get("error") or r.get("skipped") or r.get("note") or ""
        if r.get("oom"):
            note = "out of memory"
        timed = r.get("timed") and e is not None and e.get("timed")
        lines.append(
            [
                r.get("model"),
                r.get("impl"),
                str(r.get("batch")),
                _fmt(r.get("step_ms"), ".1f"),
                _fmt(r.get("img_per_s"), ".2f"),
                _fmt(r.get("peak_MiB"), ".1f"),
                _fmt(r.get("saved_MiB"), ".2f"),
                _fmt(_ratio(r, e, "step_ms") if timed else None, ".2f"),
                _fmt(None if "not comparable" in note else _ratio(r, e, "peak_bytes"), ".2f"),
                _fmt(_ratio(r, e, "saved_bytes"), ".3f"),
                str(lb.get("largest_batch") or lb.get("skipped") or "-"),
                note[:90],
            ]
        )
    return _table(head, lines, markdown)


def _table(head, lines, markdown):
    if markdown:
        out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        out += ["| " + " | ".join(str(c).replace("|", "/") for c in ln) + " |" for ln in lines]
        return "\n".join(out)
    widths = [max(len(str(c)) for c in col) for col in zip(head, *lines)] if lines else [len(h) for h in head]
    fmt = lambda row: "  ".join(str(c).ljust(w) for c, w in zip(row, widths)).rstrip()  # noqa: E731
    return "\n".join([fmt(head), fmt(["-" * w for w in widths])] + [fmt(ln) for ln in lines])


def kernel_tables(res: dict, markdown: bool = False) -> str:
    k = res.get("kernels", {})
    parts = []
    ceil = res.get("ceilings", {})
    if ceil:
        parts.append(
            "measured ceilings: "
            + ", ".join(
                f"{n} {v.get('GBps', v.get('TFLOPs'))} {'GB/s' if 'GBps' in v else 'TFLOP/s'}"
                for n, v in ceil.items()
                if isinstance(v, dict) and ("GBps" in v or "TFLOPs" in v)
            )
        )
    bn = k.get("bn_relu", [])
    if bn and any(r.get("timed") for r in bn):
        head = ["shape", "impl", "fwd GB/s", "fwd % copy", "bwd GB/s", "bwd % copy"]
        lines = [
            [
                "x".join(map(str, r["shape"])),
                impl,
                _fmt(r.get(f"{impl}_fwd_GBps"), ".0f"),
                _fmt(r.get(f"{impl}_fwd_pct_copy"), ".0f"),
                _fmt(r.get(f"{impl}_bwd_GBps"), ".0f"),
                _fmt(r.get(f"{impl}_bwd_pct_copy"), ".0f"),
            ]
            for r in bn
            for impl in ("ours", "eager", "compile")
        ]
        parts.append(_table(head, lines, markdown))
    elif bn:
        parts.append(
            "BN-ReLU: smoke only ("
            + ", ".join(f"{k}={v}" for r in bn for k, v in r.items() if k.endswith(("_ok", "_error")))
            + ")"
        )
    bnp = k.get("bn_parts", [])
    if bnp and any(r.get("timed") for r in bnp):
        head = ["shape", "pass", "ms", "GB/s", "% copy"]
        lines = [
            [
                "x".join(map(str, r["shape"])),
                name,
                _fmt(r.get(f"{name}_ms"), ".4f"),
                _fmt(r.get(f"{name}_GBps"), ".0f"),
                _fmt(r.get(f"{name}_pct_copy"), ".0f"),
            ]
            for r in bnp
            for name in ("stats", "apply", "backward")
        ]
        parts.append(
            "BN passes apart (ideal bytes: stats |x|, apply 2|x|, backward 5|x|)\n\n" + _table(head, lines, markdown)
        )
    elif bnp:
        parts.append(
            "BN passes apart: smoke only ("
            + ", ".join(f"{k}={v}" for r in bnp for k, v in r.items() if k.endswith(("_ok", "error")))
            + ")"
        )
    conv = k.get("conv", {})
    rows = conv.get("rows", [])
    if rows and any(r.get("timed") for r in rows):
        head = ["model", "C>K", "k/s/d", "HxW", "pass", "ours TF/s", "cudnn TF/s", "compile TF/s", "ours % peak"]
        lines = []
        for r in rows:
            for p in ("fprop", "dgrad", "wgrad"):
                lines.append(
                    [
                        r["model"],
                        f"{r['C']}>{r['K']}",
                        f"{r['k']}/{r['stride']}/{r['dil']}",
                        f"{r['H']}x{r['W']}",
                        p,
                        _fmt(r.get(f"ours_{p}_TFLOPs"), ".0f"),
                        _fmt(r.get(f"cudnn_{p}_TFLOPs"), ".0f"),
                        _fmt(r.get(f"compile_{p}_TFLOPs"), ".0f"),
                        _fmt(r.get(f"ours_{p}_pct_peak"), ".0f"),
                    ]
                )
        parts.append(_table(head, lines, markdown))
    elif rows:
        bad = [f"{k}" for r in rows for k, v in r.items() if (k.endswith("_ok") and not v) or k.endswith("_error")]
        parts.append(
            f"conv passes: {conv.get('note')}; {len(rows)} shapes, "
            + ("all ok" if not bad else "failed: " + ", ".join(bad))
        )
    return "\n\n".join(parts)


def data_table(res: dict, markdown: bool = False) -> str:
    rows = res.get("data", [])
    if not rows:
        return ""
    head = ["case", "backend", "device", "workers", "batch", "images/s", "note"]
    lines = [
        [
            r.get("case"),
            r.get("backend"),
            r.get("device"),
            str(r.get("workers")),
            str(r.get("batch")),
            _fmt(r.get("images_per_s"), ".1f"),
            (r.get("error") or "")[:80],
        ]
        for r in rows
    ]
    return _table(head, lines, markdown)


def fullres_table(res: dict, markdown: bool = False) -> str:
    rows = res.get("model", {}).get("fullres", [])
    if not rows:
        return ""
    head = ["model", "impl", "size", "bn", "largest batch", "first failure", "complete", "peak MiB at largest", "note"]
    lines = []
    for r in rows:
        fits = [t for t in r.get("tries", []) if t.get("fits") and t.get("batch") == r.get("largest_batch")]
        lines.append(
            [
                r.get("model"),
                r.get("impl"),
                "x".join(map(str, r.get("size") or [])),
                r.get("bn", ""),
                str(r.get("largest_batch") or "-"),
                str(r.get("first_failure") or "-"),
                str(r.get("complete", "-")),
                _fmt(fits[0].get("peak_MiB") if fits else None, ".0f"),
                (r.get("error") or r.get("skipped") or "")[:90],
            ]
        )
    return _table(head, lines, markdown)


def goals_table(res: dict, markdown: bool = False) -> str:
    lines = [
        [g["goal"], _fmt(g["value"], "") if g["value"] is not None else "-", g["status"]] for g in res.get("goals", [])
    ]
    return _table(["goal", "value", "status"], lines, markdown)


def text_report(res: dict) -> str:
    parts = ["MODEL LEVEL (" + res.get("model", {}).get("note", "") + ")", model_table(res), ""]
    if res.get("model", {}).get("fullres"):
        parts += ["LARGEST BATCH AT FULL RESOLUTION", fullres_table(res), ""]
    parts += ["KERNEL LEVEL", kernel_tables(res), ""]
    if res.get("data"):
        parts += ["DATA PIPELINES", data_table(res), ""]
    parts += ["GOALS (" + GOALS_NOTE + ")", goals_table(res)]
    skipped = [f"{name}: {s}" for name, sec in res.get("sections", {}).items() for s in sec.get("skipped", [])]
    errors = [f"{name}: {sec['error']}" for name, sec in res.get("sections", {}).items() if sec.get("error")]
    if skipped or errors or res.get("notes"):
        parts += ["", "NOTES / SKIPPED"] + [f"- {n}" for n in res.get("notes", []) + errors + skipped]
    return "\n".join(parts)


def plot(res: dict, out_dir: Path, stem: str) -> tuple[list[str], str | None]:
    """One PNG per model: step time and peak memory against batch size, one line per implementation."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return [], "matplotlib is not importable: no plots"
    points: dict[str, dict[str, list]] = {}
    m = res.get("model", {})
    for r in m.get("fixed", []) + m.get("sweep", []):
        if r.get("timed") and "error" not in r:
            points.setdefault(r["model"], {}).setdefault(r["impl"], []).append(
                (r["batch"], r["step_ms"], r.get("peak_MiB"))
            )
    for lb in m.get("largest", []):
        for t in lb.get("tries", []):
            if t.get("fits"):
                points.setdefault(lb["model"], {}).setdefault(lb["impl"], []).append(
                    (t["batch"], t["step_ms"], t.get("peak_MiB"))
                )
    files = []
    dev = res.get("environment", {}).get("device", "?")
    for model, impls in points.items():
        fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
        for impl, pts in sorted(impls.items()):
            pts = sorted(set(pts))
            bs = [p[0] for p in pts]
            axes[0].plot(bs, [p[1] for p in pts], "o-", label=impl)
            axes[1].plot(bs, [p[2] for p in pts], "o-", label=impl)
        mem = "peak RSS delta (MiB)" if dev == "cpu" else "torch.cuda.max_memory_allocated (MiB)"
        ticks = sorted({p[0] for pts in impls.values() for p in pts})
        for ax, yl in zip(axes, ("training step time (ms, median)", mem)):
            ax.set_xlabel("batch size")
            ax.set_ylabel(yl)
            ax.set_xscale("log", base=2)
            ax.set_xticks(ticks, [str(t) for t in ticks])
            ax.minorticks_off()
            ax.grid(alpha=0.3)
        axes[0].legend(fontsize=8)
        cfg = res.get("config", {}).get("models", {}).get(model, {})
        fig.suptitle(
            f"{model} {cfg.get('size', '')}px width {cfg.get('width', '')} on {dev}"
            + (" (CPU, shared machine: noisy)" if dev == "cpu" else ""),
            fontsize=10,
        )
        fig.tight_layout()
        path = out_dir / f"{stem}-{model}.png"
        fig.savefig(path, dpi=90)
        plt.close(fig)
        files.append(str(path))
    return files, None


README_BEGIN, README_END = "<!-- bench:latest:begin -->", "<!-- bench:latest:end -->"


def markdown_block(res: dict, json_path: str, plots: list[str], readme_dir: Path) -> str:
    env = res.get("environment", {})
    lines = [
        f"Latest: `{json_path}` ({res.get('mode')} mode, {env.get('device')}"
        f"{' / ' + env.get('cpu_model', '') if env.get('device') == 'cpu' else ''}, torch {env.get('torch')}, "
        f"commit {str(env.get('commit'))[:10]}{' + local changes' if env.get('dirty') else ''}, "
        f"{res.get('wall_s')} s, budget scale {res.get('config', {}).get('budget_scale', 1.0)}).",
        "",
    ]
    if env.get("device") == "cpu":
        lines += [
            "CPU numbers from a shared 2-core machine: timings are noisy and say nothing about a GPU. "
            "Saved-activation bytes are device-independent.",
            "",
        ]
    lines += ["**Model level** — " + res.get("model", {}).get("note", ""), "", model_table(res, True), ""]
    if res.get("model", {}).get("fullres"):
        lines += ["**Largest batch at full resolution**", "", fullres_table(res, True), ""]
    kt = kernel_tables(res, True)
    if kt:
        lines += ["**Kernel level**", "", kt, ""]
    if res.get("data"):
        lines += ["**Data pipelines**", "", data_table(res, True), ""]
    lines += ["**Goals**", "", goals_table(res, True), ""]
    for p in plots:
        rel = (
            Path(p).resolve().relative_to(readme_dir.resolve())
            if Path(p).resolve().is_relative_to(readme_dir.resolve())
            else Path(p)
        )
        lines.append(f"![{Path(p).stem}]({rel.as_posix()})")
    return "\n".join(lines)


def update_readme(readme: Path, block: str) -> None:
    text = readme.read_text() if readme.exists() else f"{README_BEGIN}\n{README_END}\n"
    if README_BEGIN not in text:
        text += f"\n{README_BEGIN}\n{README_END}\n"
    pat = re.compile(re.escape(README_BEGIN) + ".*?" + re.escape(README_END), re.S)
    readme.write_text(pat.sub(lambda _: f"{README_BEGIN}\n{block}\n{README_END}", text))
