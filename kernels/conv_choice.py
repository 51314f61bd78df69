"""Per-layer choice between the implicit-GEMM convolution (:mod:`kernels.conv`, ``"triton"``) and BN-ReLU + cuDNN
(``"torch"``): a table keyed by device and conv shape, shipped with the package, overridable.

``bn_relu_conv(..., conv="auto")`` (and ``BNReLUConv2d(conv_impl="auto")``, ``create_model(..., fused="triton",
conv_impl="auto")``: every BN-ReLU-conv layer of the model) asks :func:`choose`: a call runs the
implicit GEMMs only when the table says ``"triton"`` for every conv that reads the activation (they share one
recompute) on this device; a shape or device the table does not hold gets its ``default`` (``"torch"``: cuDNN is
the measured winner on the shapes we have). On CPU (and under the Triton interpreter) "auto" is always "torch":
interpreted kernels are a correctness tool, never faster.

Table file (JSON; data only, nothing in it is executed)::

    {"format": "widedeep-conv-choice", "version": 1, "default": "torch",
     "entries": [{"device": "NVIDIA H100 80GB HBM3", "dtype": "bf16", "N": 64, "C": 64, "K": 128, "H": 224, "W": 224,
                  "k": 3, "stride": 2, "pad": 1, "dil": 1, "impl": "torch", ...measurements...}, ...]}

``device`` is ``torch.cuda.get_device_name()``; ``dtype`` the conv compute dtype (bf16, fp16, fp32); N, H, W the
input's batch and size, C/K in/out channels, k the (square) kernel. Extra fields (times, source) are kept for
people, not read. The shipped table is ``kernels/conv_choice.json``; ``WIDEDEEP_CONV_CHOICE=/path/table.json`` (read
once, at the first lookup) or :func:`set_table` replaces it; its entries are looked up first, then the shipped ones.

Regenerate from a campaign (bench/README.md): ``python -m kernels.conv_choice --from
bench/results/<campaign>.json --out kernels/conv_choice.json`` (rows of ``bench.kernel_level``'s conv section:
``ours_{fprop,dgrad,wgrad}_ms`` vs ``cudnn_*_ms``, or of ``bench.conv_shapes``: ``igemm_ms`` vs ``bnrelu_cudnn_ms``).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from pathlib import Path

import torch

from . import _runtime

SHIPPED = Path(__file__).with_name("conv_choice.json")
ENV = "WIDEDEEP_CONV_CHOICE"
FORMAT = "widedeep-conv-choice"
IMPLS = ("torch", "triton")
KEY_FIELDS = ("device", "dtype", "N", "C", "K", "H", "W", "k", "stride", "pad", "dil")
_DTYPES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}

_tables: list[dict] | None = None  # [override, shipped], each {"default": str, "entries": {key: impl}}


def _entry_key(e: dict, where: str) -> tuple:
    missing = [f for f in KEY_FIELDS if f not in e]
    if missing:
        raise ValueError(f"{where}: entry {e!r} lacks {missing} (needs {', '.join(KEY_FIELDS)} and impl)")
    if e.get("impl") not in IMPLS:
        raise ValueError(f"{where}: entry impl must be one of {IMPLS}, got {e.get('impl')!r}")
    for f in KEY_FIELDS[2:]:
        if not isinstance(e[f], int) or isinstance(e[f], bool):
            raise ValueError(f"{where}: entry field {f!r} must be an integer, got {e[f]!r}")
    return tuple(e[f] for f in KEY_FIELDS)


def parse_table(data, where: str) -> dict:
    """Validate a table (the decoded JSON) -> {"default": impl, "entries": {key tuple: impl}}; ``where`` names it
    in the one-line error."""
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise ValueError(f'{where}: not a conv choice table (expected a JSON object with "format": "{FORMAT}")')
    if data.get("version") != 1:
        raise ValueError(f"{where}: unsupported version {data.get('version')!r} (expected 1)")
    default = data.get("default", "torch")
    if default not in IMPLS:
        raise ValueError(f"{where}: default must be one of {IMPLS}, got {default!r}")
    entries = data.get("entries", [])
    if not isinstance(entries, list):
        raise ValueError(f'{where}: "entries" must be a list')
    return {"default": default, "entries": {_entry_key(e, where): e["impl"] for e in entries}}


def load_table(path: str | os.PathLike) -> dict:
    """Read and validate a table file (see the module docstring); ValueError naming the file otherwise."""
    try:
        with open(path) as f:
            data = json.load(f)
    except OSError as e:
        raise ValueError(f"{path}: cannot read the conv choice table ({e.strerror})") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from None
    return parse_table(data, str(path))


def _load() -> list[dict]:
    global _tables
    if _tables is None:
        override = os.environ.get(ENV)
        _tables = ([load_table(override)] if override else []) + [load_table(SHIPPED)]
    return _tables


def set_table(path: str | os.PathLike | None) -> None:
    """Use ``path``'s entries before the shipped ones (None: the shipped table, plus $WIDEDEEP_CONV_CHOICE)."""
    global _tables
    _tables = None if path is None else [load_table(path), load_table(SHIPPED)]


@contextlib.contextmanager
def use_table(data: dict):
    """Tests: look up ``data`` (a decoded table) alone, inside the block."""
    global _tables
    old, _tables = _tables, [parse_table(data, "use_table()")]
    try:
        yield
    finally:
        _tables = old


def device_name(x: torch.Tensor) -> str:
    return torch.cuda.get_device_name(x.device) if x.is_cuda else x.device.type


def shape_key(x: torch.Tensor, conv, dtype: torch.dtype, device: str) -> tuple:
    """The table key of ``conv`` (an nn.Conv2d with square kernel/stride/dilation/padding) applied to ``x``."""
    N, C, H, W = x.shape
    return (
        device,
        _DTYPES.get(dtype, str(dtype)),
        N,
        C,
        conv.out_channels,
        H,
        W,
        conv.kernel_size[0],
        conv.stride[0],
        conv.padding[0],
        conv.dilation[0],
    )


def lookup(key: tuple) -> str:
    """The table's impl for ``key``: the first table (override, then shipped) that holds it, else the default."""
    tables = _load()
    for t in tables:
        if key in t["entries"]:
            return t["entries"][key]
    return tables[0]["default"]


_off_cuda = False  # tests only (:func:`lookup_off_cuda`)


@contextlib.contextmanager
def lookup_off_cuda():
    """Tests: inside the block :func:`choose` looks CPU tensors up too (device ``"cpu"``), so that the per-layer
    routing of ``conv="auto"`` can be checked under the interpreter (outside it CPU is always "torch")."""
    global _off_cuda
    old, _off_cuda = _off_cuda, True
    try:
        yield
    finally:
        _off_cuda = old


def choose(x: torch.Tensor, convs, dtype: torch.dtype) -> str:
    """``"triton"`` when the table picks the implicit GEMM for every conv in ``convs`` on x's device, else ``"torch"``.
    Never "triton" off CUDA or under the interpreter (except inside :func:`lookup_off_cuda`)."""
    if not _off_cuda and (not x.is_cuda or _runtime.INTERPRET):
        return "torch"
    dev = device_name(x)
    return "triton" if all(lookup(shape_key(x, c, dtype, dev)) == "triton" for c in convs) else "torch"


def entries_from_rows(rows: list[dict], device: str, source: str = "") -> list[dict]:
    """Table entries from measured rows (``bench.kernel_level`` conv rows or ``bench.conv_shapes`` rows): "triton"
    where our fused conv's forward+backward time is below BN-ReLU + cuDNN's, else "torch". Rows without both
    timings are left out (they would have no measured winner)."""
    dt = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}
    out = []
    for r in rows:
        if all(f"ours_{p}_ms" in r and f"cudnn_{p}_ms" in r for p in ("fprop", "dgrad", "wgrad")):
            ours = sum(r[f"ours_{p}_ms"] for p in ("fprop", "dgrad", "wgrad"))
            theirs = sum(r[f"cudnn_{p}_ms"] for p in ("fprop", "dgrad", "wgrad"))
            what = "sum of fprop+dgrad+wgrad ms; cuDNN on a materialised relu(bn(x)), BN-ReLU apply not counted"
        elif "igemm_ms" in r and "bnrelu_cudnn_ms" in r:
            ours, theirs = r["igemm_ms"], r["bnrelu_cudnn_ms"]
            what = "forward+backward step ms of the block (Triton BN-ReLU recompute + cuDNN)"
        else:
            continue
        e = {
            "device": device,
            "dtype": dt.get(r.get("dtype"), r.get("dtype")),
            **{f: int(r[f]) for f in KEY_FIELDS[2:]},
        }
        e.update(
            impl="triton" if ours < theirs else "torch",
            ours_ms=round(ours, 4),
            cudnn_ms=round(theirs, 4),
            compared=what,
        )
        if source:
            e["source"] = source
        out.append(e)
    return out


def _campaign_rows(data) -> tuple[list[dict], str]:
    """(rows, device) of a campaign JSON (bench.runner) or a bench.conv_shapes result file."""
    if isinstance(data, dict) and "kernels" in data:
        return data["kernels"]["conv"]["rows"], data["environment"]["device"]
    for field in ("rows", "results"):  # bench.conv_shapes writes "results" (bench._env.write_results)
        if isinstance(data, dict) and isinstance(data.get(field), list):
            return data[field], (data.get("environment") or {}).get("device", "")
    raise ValueError("expected a bench campaign JSON (kernels.conv.rows) or a bench.conv_shapes result (rows)")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m kernels.conv_choice", description=__doc__.splitlines()[0])
    ap.add_argument("--from", dest="src", required=True, help="campaign JSON with measured conv rows")
    ap.add_argument("--out", required=True, help="table file to write (JSON)")
    ap.add_argument("--merge", action="store_true", help="keep --out's entries for other devices/shapes")
    args = ap.parse_args(argv)
    try:
        with open(args.src) as f:
            rows, device = _campaign_rows(json.load(f))
        if not device:
            raise ValueError("the rows name no device (environment.device)")
        new = entries_from_rows(rows, device, source=os.path.basename(args.src))
        old = json.loads(Path(args.out).read_text())["entries"] if args.merge and Path(args.out).exists() else []
        keys = {_entry_key(e, args.src) for e in new}
        entries = [e for e in old if _entry_key(e, args.out) not in keys] + new
        table = {"format": FORMAT, "version": 1, "default": "torch", "entries": entries}
        parse_table(table, args.out)
    except (OSError, ValueError, KeyError, json.JSONDecodeError) as e:
        print(f"kernels.conv_choice: {args.src}: {e}", file=sys.stderr)
        return 2
    tmp = Path(args.out).with_suffix(".tmp")
    tmp.write_text(json.dumps(table, indent=1) + "\n")
    tmp.replace(args.out)  # nothing half-written
    won = sum(e["impl"] == "triton" for e in new)
    print(f"{args.out}: {len(new)} shapes from {args.src} on {device}: triton wins {won}, torch {len(new) - won}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
