"""Export a ResNet-38 to ONNX and check it in onnxruntime: ``python -m widedeep.export LABEL_OR_WEIGHTS OUT.onnx``.

LABEL_OR_WEIGHTS: a model label or plain name (``voc_rna-a1_cls21_s8``, ``resnet38_a1``; random weights), or a
weights file (``.params``, ``.pth``, ``.pth.tar``, ``.safetensors``; the label from its name or ``--label``).
The model is exported in eval mode with ``torch.onnx.export(..., dynamo=True)``; fused models (``--fused``)
export the same graph as plain ones (standard ONNX ``BatchNormalization``, ``Relu``/``LeakyRelu``, ``Conv``; see
:mod:`kernels.plain`). Unless ``--no-check``, the file is run in onnxruntime on a random input and compared
with torch: the max abs diff is printed, and a diff above ``--tolerance`` (relative to the largest output
value) is an error. The file appears only once it was written whole and (unless ``--no-check``) checked.

Input: (N, 3, H, W) float32 (``--size H W``; default 224x224 for classifiers, 512x512 for segmentation nets),
N = 1 fixed, or symbolic with ``--dynamic-batch``. Output: classifier scores (N, classes) or segmentation scores
(N, classes, H/8, W/8); a trunk-only model (``resnet38d``, ``--num-classes 0``) gives its features.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import logging
import os
import sys
import warnings
from pathlib import Path

WEIGHT_SUFFIXES = (".params", ".pth", ".pt", ".tar", ".safetensors", ".npz")


class ExportError(Exception):
    """A failure with a one-line explanation for the command line."""


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m widedeep.export", description=__doc__.split("\n\n")[0])
    ap.add_argument("model", metavar="LABEL_OR_WEIGHTS", help="model label / plain name, or a weights file")
    ap.add_argument("output", help="the ONNX file to write (.onnx)")
    ap.add_argument("--label", help="model label of a weights file whose name does not carry it")
    ap.add_argument("--size", type=int, nargs=2, metavar=("H", "W"), help="input height and width")
    ap.add_argument("--opset", type=int, default=18, help="ONNX opset (default 18, the dynamo exporter's own)")
    ap.add_argument("--dynamic-batch", action="store_true", help="symbolic batch dimension (checked with N=2)")
    ap.add_argument("--width", type=float, default=1.0, help="channel multiplier (1 = the published nets)")
    ap.add_argument("--num-classes", type=int, help="classifier outputs (default: the label's)")
    ap.add_argument("--output-stride", type=int, choices=(8, 16, 32), help="override the label's output stride")
    ap.add_argument(
        "--fused", action="store_true", help="build the model on the fused kernels first (exports the same plain graph)"
    )
    ap.add_argument("--activation", choices=("relu", "leaky_relu"), help="the trunk's BN activation")
    ap.add_argument("--activation-param", type=float, help="leaky ReLU slope")
    ap.add_argument("--bn-eps", type=float, help="every BatchNorm's eps")
    ap.add_argument("--dilate-first-conv", action="store_true", help="Mapillary's dilated A2 (see README)")
    ap.add_argument(
        "--weights-convention",
        choices=("plain", "inplace_abn"),
        help="BN gammas of a Mapillary/NVIDIA file (see the README's lineages table)",
    )
    ap.add_argument("--no-verify-weights", dest="verify", action="store_false", help="skip the md5 check")
    ap.add_argument("--no-check", dest="check", action="store_false", help="do not run onnxruntime")
    ap.add_argument(
        "--tolerance",
        type=float,
        default=1e-4,
        help="largest accepted max abs diff, relative to the largest |output| (default 1e-4)",
    )
    ap.add_argument("--seed", type=int, default=0, help="seed of the random check input (and random weights)")
    ap.add_argument("--debug", action="store_true", help="show tracebacks instead of one-line errors")
    return ap


def _is_weights(arg: str) -> bool:
    return os.path.exists(arg) or arg.endswith(WEIGHT_SUFFIXES)


def build(args: argparse.Namespace):
    """The eval-mode model the arguments describe; (model, label)."""
    import torch

    from widedeep.models import create_model, parse_label

    weights = None
    label = args.label or args.model
    if _is_weights(args.model):
        weights = args.model
        if not os.path.isfile(weights):
            raise ExportError(f"weights file {weights} not found")
        if args.label is None:
            try:
                label = parse_label(weights).label
            except ValueError:
                raise ExportError(
                    f"cannot tell the model from the file name {Path(weights).name!r}: pass --label "
                    "(e.g. --label ilsvrc-cls_rna-a1_cls1000 or --label resnet38d)"
                ) from None
    kw: dict = dict(width=args.width, fused=bool(args.fused))
    for name in ("num_classes", "output_stride", "activation", "activation_param", "bn_eps", "weights_convention"):
        if getattr(args, name) is not None:
            kw[name] = getattr(args, name)
    if args.dilate_first_conv:
        kw["dilate_first_conv"] = True
    if weights is not None:
        kw.update(weights=weights, weights_verify=args.verify)
    torch.manual_seed(args.seed)
    return create_model(label, **kw).eval(), label


def export(model, path: Path, size: tuple[int, int], opset: int, dynamic_batch: bool):
    """torch.onnx.export (dynamo) of ``model`` for (1, 3, H, W) float32 input into ``path``."""
    import torch

    for mod in ("onnx", "onnxscript"):
        try:
            __import__(mod)
        except ImportError:
            raise ExportError(
                f"torch.onnx.export(dynamo=True) needs {mod}: pip install onnx onnxscript (or pip install -e '.[test]')"
            ) from None
    x = torch.zeros(2 if dynamic_batch else 1, 3, *size)
    shapes = ({0: torch.export.Dim("batch", min=1)},) if dynamic_batch else None
    log = io.StringIO()  # the exporter's progress lines: shown only on failure
    try:
        with torch.no_grad(), contextlib.redirect_stdout(log), warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # torch-internal deprecations, not the user's business
            program = torch.onnx.export(
                model,
                (x,),
                dynamo=True,
                opset_version=opset,
                dynamic_shapes=shapes,
                input_names=["image"],
                output_names=["scores"],
            )
            program.save(str(path))
    except Exception as e:
        raise ExportError(
            f"torch.onnx.export failed: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            f"\n{log.getvalue()[-2000:]}"
        ) from e


def check(model, path: Path, size: tuple[int, int], batch: int, seed: int) -> tuple[float, float, str]:
    """(max abs diff onnxruntime vs torch, max |torch output|, onnxruntime version) on a random input."""
    import torch

    try:
        import onnxruntime as ort
    except ImportError:
        raise ExportError("onnxruntime is not installed (pip install onnxruntime), or pass --no-check") from None
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 3, *size, generator=g)
    with torch.no_grad():
        ref = model(x).float().numpy()
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    out = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]
    if out.shape != ref.shape:
        raise ExportError(f"{path}: onnxruntime output shape {out.shape} differs from torch's {ref.shape}")
    return float(abs(out - ref).max()), float(abs(ref).max()), ort.__version__


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if not args.debug:  # "torchvision is not installed. Skipping torchvision::nms" and the like
        for name in ("torch.onnx", "torch.onnx._internal.exporter._registration"):
            logging.getLogger(name).setLevel(logging.ERROR)
    try:
        return _run(args)
    except Exception as e:
        if args.debug:
            raise
        from widedeep.weights import ChecksumError, WeightsFormatError, WeightsMismatchError

        if isinstance(
            e, (ExportError, FileNotFoundError, ChecksumError, WeightsFormatError, WeightsMismatchError, ValueError)
        ):
            print(f"python -m widedeep.export: error: {e}", file=sys.stderr)
            return 2
        raise


def _run(args: argparse.Namespace) -> int:
    from widedeep.fileio import temporary_path

    out = Path(args.output)
    if out.suffix != ".onnx":
        raise ExportError(f"output {out} must end in .onnx")
    if not out.parent.is_dir():
        raise ExportError(f"output folder {out.parent} does not exist")
    if args.size is not None and min(args.size) < 8:
        raise ExportError(f"--size {args.size[0]} {args.size[1]}: height and width must be at least 8")
    if not 7 <= args.opset <= 23:
        raise ExportError(f"--opset {args.opset}: expected 7 to 23 (18 or later for the dynamo exporter's own)")
    model, label = build(args)
    size = tuple(args.size) if args.size else ((512, 512) if model.segmentation else (224, 224))
    tmp = temporary_path(out)
    try:
        export(model, tmp, size, args.opset, args.dynamic_batch)
        what = (
            f"{label} ({'fused' if args.fused else 'plain'}, width {args.width:g}), input (N, 3, {size[0]}, {size[1]})"
        )
        if args.check:
            diff, scale, version = check(model, tmp, size, 2 if args.dynamic_batch else 1, args.seed)
            if not diff <= args.tolerance * max(scale, 1.0):
                raise ExportError(
                    f"onnxruntime differs from torch by {diff:.3g} (outputs up to {scale:.3g}), above "
                    f"--tolerance {args.tolerance:g}: {out} not written"
                )
            print(f"onnxruntime {version} vs torch: max abs diff {diff:.3g} (outputs up to {scale:.3g})")
        os.replace(tmp, out)
    finally:
        for leftover in (tmp, tmp.with_name(tmp.name + ".data")):
            if leftover.exists():
                leftover.unlink()
    print(f"wrote {out}: {what}, opset {args.opset}{', dynamic batch' if args.dynamic_batch else ''}")
    return 0


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    sys.exit(main())
