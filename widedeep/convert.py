"""Convert ResNet-38 weights between formats: ``python -m widedeep.convert IN OUT [--label LABEL]``.

IN: ademxapp ``.params`` (any NDArray generation), psa ``.pth``, or ``.safetensors``.
OUT: ``.safetensors``, ``.params`` (MXNet 1.x V2 records, or ``--legacy`` for MXNet 0.x records) or ``.pth``.
The weights are checked by loading them into the model named by ``--label`` (default: read from the file
name, e.g. ``voc_rna-a1_cls21_s8_ep-0001.params``), so a converted file is known to fit.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from widedeep.models import create_model, parse_label
from widedeep.weights import load_weights, read_state_dict, save_weights


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
    ap.add_argument("--legacy", action="store_true", help="write MXNet 0.x legacy records into .params")
    ap.add_argument("--no-verify", action="store_true", help="skip the md5 check of released ademxapp files")
    args = ap.parse_args(argv)

    label = args.label or _guess_label(args.input)
    if label is None:
        ap.error(f"cannot tell the model from the file name {Path(args.input).name!r}: pass --label "
                 "(e.g. --label ilsvrc-cls_rna-a1_cls1000 or --label resnet38d)")
    state = read_state_dict(args.input, verify=not args.no_verify)
    # Loading into the model checks every name and shape before anything is written.
    load_weights(create_model(label), state, name=args.input)
    save_weights(state, args.output, metadata={"label": label, "source": Path(args.input).name},
                 params_format="legacy" if args.legacy else "v2")
    print(f"wrote {args.output}: {len(state)} tensors, model {label}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
