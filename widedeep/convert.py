"""Convert ResNet-38 weights between formats: ``python -m widedeep.convert IN OUT [--label LABEL]``.

IN: ademxapp ``.params`` (any NDArray generation), psa ``.pth``, or ``.safetensors``.
OUT: ``.safetensors``, ``.params`` (MXNet 1.x V2 records, or ``--legacy`` for MXNet 0.x records) or ``.pth``.
The weights are checked by loading them into the model named by ``--label`` (default: read from the file
name, e.g. ``voc_rna-a1_cls21_s8_ep-0001.params``), so a converted file is known to fit. A trunk-only label
(``--label resnet38d``) keeps the trunk and drops the file's classifier. Model A's pool style (decided from
the file's content) is recorded in ``.safetensors``/``.pth`` outputs.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from widedeep.models import create_model, model_args, parse_label
from widedeep.weights import (
    ChecksumError,
    WeightsFormatError,
    WeightsMismatchError,
    load_weights,
    pool_style_of,
    read_weights,
    save_weights,
)


def _guess_label(path: str) -> str | None:
    try:
        return parse_label(path).label
    except ValueError:
        return None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m widedeep.convert", description=__doc__.split("\n\n")[0])
    ap.add_argument("input", help="weights file: .params, .pth, .pt, .pth.tar or .safetensors")
    ap.add_argument("output", help="output file: .safetensors, .params or .pth")
    ap.add_argument("--label", help="model label or plain name the weights belong to (default: from the file name)")
    ap.add_argument("--width", type=float, default=1.0, help="channel multiplier of the weights (1 = published)")
    ap.add_argument("--legacy", action="store_true", help="write MXNet 0.x legacy records into .params")
    ap.add_argument(
        "--weights-convention",
        choices=["inplace_abn", "plain"],
        help="BN gammas of a Mapillary InPlace-ABN file: inplace_abn = write |gamma| + eps (plain BN "
        "values); plain = keep them (NVIDIA's re-keyed file). See the README's lineages table",
    )
    ap.add_argument(
        "--no-verify-weights",
        "--no-verify",
        dest="no_verify",
        action="store_true",
        help="skip the md5 check of files named like the released ademxapp files (a mismatch only warns)",
    )
    args = ap.parse_args(argv)

    label = args.label or _guess_label(args.input)
    if label is None:
        ap.error(
            f"cannot tell the model from the file name {Path(args.input).name!r}: pass --label "
            "(e.g. --label ilsvrc-cls_rna-a1_cls1000 or --label resnet38d)"
        )
    wf = read_weights(args.input, verify=not args.no_verify, weights_convention=args.weights_convention)
    metadata = {"label": label, "source": Path(args.input).name}
    if model_args(label).get("variant") in ("a", "a2"):
        metadata["pool_style"], why = pool_style_of(wf, model_args(label)["variant"])
        logging.getLogger("widedeep.convert").info("pool style %s: %s", metadata["pool_style"], why)
    # Loading into the model checks every name and shape before anything is written.
    report = load_weights(create_model(label, width=args.width), wf)
    state = {k: v for k, v in wf.state.items() if k not in report.dropped}
    save_weights(state, args.output, metadata=metadata, params_format="legacy" if args.legacy else "v2")
    dropped = f" (dropped {len(report.dropped)} classifier tensors: {label} has none)" if report.dropped else ""
    print(f"wrote {args.output}: {len(state)} tensors, model {label}{dropped}")
    return 0


def cli(argv: list[str] | None = None) -> int:
    """``main`` for the command line: a bad file or label is one line on stderr and exit status 2."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    try:
        return main(argv)
    except (FileNotFoundError, ChecksumError, WeightsFormatError, WeightsMismatchError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(cli())
