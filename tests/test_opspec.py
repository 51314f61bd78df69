"""One argument specification per fused op (kernels/opspec.py): the eager autograd Function and the custom op are
both generated from it.

A toy op with every kind of argument (a saved differentiable tensor, an optional one, a differentiable tensor
list, a decoded argument, an eager-only one) runs through both paths against plain torch autograd; then one
argument is added to its spec *and nowhere else but the implementation*, and both paths take it. The real specs'
schemas are pinned: they are the ops' public interface (saved exported programs name them).
"""

from __future__ import annotations

import itertools

import pytest
import torch

from kernels.bn_relu import BN_ACT
from kernels.bn_relu_conv import BN_ACT_CONV
from kernels.opspec import Arg, OpSpec

_names = itertools.count()


def _decode_scale(a):
    # the op passes a float; an eager caller may pass a (float,) box: the decoded form is the float
    return a.scale[0] if isinstance(a.scale, tuple) else a.scale


def toy_spec(extra: bool = False) -> OpSpec:
    """y = (x * w + sum(ws)) * scale [+ shift], y2 = x * bias (bias optional: then y2 = x).

    ``extra=True`` adds the argument ``shift`` (one Arg here, one line in the implementation)."""
    args = [
        Arg("x", "Tensor", grad=True, saved=True),
        Arg("w", "Tensor", grad=True, saved=True),
        Arg("bias", "Tensor?", grad=True, saved=True),
        Arg("ws", "Tensor[]", grad=True),
        Arg("scale", "float", decode=_decode_scale),
        Arg("tag", None, default="op"),  # eager-only
    ]
    if extra:
        args.insert(5, Arg("shift", "float"))

    def forward(a, stash):
        y = (a.x * a.w + sum(a.ws)) * a.scale
        if extra:
            y = y + a.shift
        return [y, a.x * a.bias if a.bias is not None else a.x.clone()]

    def backward(a, grads, needs):
        g, g2 = grads
        out = {"x": g * a.w * a.scale + (g2 * a.bias if a.bias is not None else g2), "w": g * a.x * a.scale}
        if a.bias is not None and needs["bias"]:
            out["bias"] = g2 * a.x
        out["ws"] = [g * a.scale for _ in needs["ws"]]
        return out

    return OpSpec(
        f"toy{next(_names)}",
        args,
        forward=forward,
        backward=backward,
        fake=lambda a: [torch.empty_like(a.x), torch.empty_like(a.x)],
        layout=lambda a: torch.contiguous_format,
        returns="Tensor[]",
    )


def _reference(x, w, bias, ws, scale, shift=0.0):
    y = (x * w + sum(ws)) * scale + shift
    return [y, x * bias if bias is not None else x.clone()]


def _inputs(with_bias: bool):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 4, generator=g, dtype=torch.float64)
    w = torch.randn(3, 4, generator=g, dtype=torch.float64)
    bias = torch.randn(3, 4, generator=g, dtype=torch.float64) if with_bias else None
    ws = [torch.randn(3, 4, generator=g, dtype=torch.float64) for _ in range(2)]
    return x, w, bias, ws


def _run(fn, tensors, **kw):
    leaves = [t.clone().requires_grad_() if t is not None else None for t in tensors[:3]]
    ws = [t.clone().requires_grad_() for t in tensors[3]]
    outs = fn(*leaves, ws, **kw)
    (outs[0].square().sum() + outs[1].sin().sum()).backward()
    return [o.detach() for o in outs], [t.grad for t in [*leaves, *ws] if t is not None]


@pytest.mark.parametrize("extra", [False, True], ids=["spec", "spec+shift"])
@pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "no_bias"])
def test_both_paths_follow_the_spec(extra, with_bias):
    """Eager Function and custom op (and its opcheck) equal plain torch autograd, values and gradients, before
    and after an argument is added to the spec: nothing but the spec and its implementation changed."""
    spec = toy_spec(extra)
    op = spec.register("widedeep_opspec_test")
    tensors = _inputs(with_bias)
    scale, shift = 0.75, 0.25
    more = dict(shift=shift) if extra else {}

    def eager(x, w, bias, ws, **kw):
        values = [x, w, bias, ws, (scale,), *([kw["shift"]] if extra else []), "eager"]
        return spec.apply(*values)

    def custom_op(x, w, bias, ws, **kw):
        return op(x, w, bias, ws, scale, *([kw["shift"]] if extra else []))

    want_y, want_g = _run(lambda x, w, b, ws, **kw: _reference(x, w, b, ws, scale, **kw), tensors, **more)
    for name, fn in (("eager", eager), ("op", custom_op)):
        y, g = _run(fn, tensors, **more)
        for a, b in zip(y + g, want_y + want_g):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12, msg=name)
    x, w, bias, ws = tensors
    args = (x.requires_grad_(), w, bias, ws, scale, *([shift] if extra else []))
    torch.library.opcheck(op, args)
    assert ("float shift" in spec.schema()) == extra and "tag" not in spec.schema()  # eager-only stays out


def test_eager_function_saves_tensors_through_save_for_backward():
    """Saved tensors go through save_for_backward (saved-tensor hooks such as checkpointing and offloading see
    them); the differentiable list that the backward does not read is not kept at all."""
    spec = toy_spec()
    x, w, bias, ws = _inputs(True)
    packed = []

    def pack(t):
        packed.append(t)
        return t

    leaves = [t.clone().requires_grad_() for t in (x, w, bias)]
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        outs = spec.apply(*leaves, [t.clone().requires_grad_() for t in ws], 0.5, "eager")
    assert len(packed) == 3 and all(any(p is q for q in leaves) for p in packed)
    sum(o.sum() for o in outs).backward()
    assert all(t.grad is not None for t in leaves)


def test_spec_refuses_bad_arguments():
    with pytest.raises(ValueError, match="only tensors are differentiable"):
        Arg("alpha", "float", grad=True)
    with pytest.raises(ValueError, match="is not one of"):
        Arg("alpha", "double")
    with pytest.raises(ValueError, match="names repeat"):
        OpSpec("dup", [Arg("x", "Tensor"), Arg("x", "Tensor")], forward=None, backward=None, fake=None, layout=None)


def test_fused_op_schemas_are_stable():
    """The ops' schemas as generated from the specs: argument names, types and order are the ops' interface."""
    assert BN_ACT.schema() == (
        "(Tensor x, Tensor stats, Tensor? weight, Tensor? bias, bool batch_stats, str backend, ScalarType out_dtype, "
        "str activation, float activation_param) -> Tensor"
    )
    assert BN_ACT_CONV.schema() == (
        "(Tensor x, Tensor stats, Tensor? weight, Tensor? bias, Tensor[] conv_weights, Tensor[] conv_biases, "
        "bool[] has_bias, SymInt[] geometry, Tensor? mask, float keep, bool batch_stats, str backend, "
        "ScalarType cdtype, str conv_impl, str activation, float activation_param) -> Tensor[]"
    )
    assert BN_ACT.backward_schema().endswith("-> (Tensor, Tensor, Tensor)")
    assert BN_ACT_CONV.backward_schema().endswith("-> (Tensor, Tensor, Tensor, Tensor[], Tensor[])")


def test_op_backward_with_an_empty_tensor_list():
    """No conv has a bias (ResNet-38's case): the op path's backward returns an empty list for ``conv_biases``."""
    spec = toy_spec()
    op = spec.register("widedeep_opspec_test")
    x, w, bias, _ = _inputs(True)
    y, g = _run(lambda x, w, b, ws: op(x, w, b, ws, 0.5), (x, w, bias, []))
    want_y, want_g = _run(lambda x, w, b, ws: _reference(x, w, b, ws, 0.5), (x, w, bias, []))
    for a, b in zip(y + g, want_y + want_g):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_double_backward_is_refused_clearly():
    """The generated backward is not differentiable: create_graph=True raises instead of a silently wrong result."""
    spec = toy_spec()
    x, w, bias, ws = _inputs(True)
    x.requires_grad_()
    y = spec.apply(x, w, bias, ws, 0.5, "eager")[0].square().sum()
    with pytest.raises(RuntimeError, match="double backward"):
        torch.autograd.grad(y, x, create_graph=True)


def test_bn_act_backward_op_fake_matches_real_without_affine():
    """An absent gamma/beta: the backward op's real and fake outputs agree (dtype included) under autocast-like
    dtypes (x fp32, y bf16)."""
    from kernels import ops

    bn = torch.nn.BatchNorm2d(4, affine=False)
    x = torch.randn(2, 4, 3, 3)
    stats = ops.stats_of(x, bn, "torch")
    dy = torch.randn(2, 4, 3, 3, dtype=torch.bfloat16)
    args = ([dy], x, stats, None, None, True, "torch", torch.bfloat16, "relu", 0.01)
    torch.library.opcheck(ops.bn_act_backward, args)


def test_sync_block_compiles_fullgraph_as_the_first_call(tmp_path):
    """SyncBN blocks keep the eager Function under torch.compile (a process group is no op argument): Dynamo
    traces it, so it must exist before the first call (no exec/type() inside the trace). A fresh interpreter."""
    import subprocess
    import sys
    from pathlib import Path

    code = (
        "import torch, torch.nn as nn, kernels\n"
        "bn = nn.BatchNorm2d(4)\n"
        "f = torch.compile(lambda x: kernels.bn_relu(x, bn, backend='torch', sync=True).sum(), backend='eager',"
        " fullgraph=True)\n"
        "print('ok', float(f(torch.randn(2, 4, 3, 3))))\n"
    )
    root = Path(__file__).resolve().parents[1]
    env = {**__import__("os").environ, "PYTHONPATH": str(root), "TORCHINDUCTOR_CACHE_DIR": str(tmp_path)}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=root, timeout=600)
    assert r.returncode == 0 and "ok" in r.stdout, r.stdout[-2000:] + r.stderr[-3000:]
