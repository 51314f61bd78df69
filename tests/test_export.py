"""Deploying as a plain network: torch.export / ONNX (run in onnxruntime) / torch.jit.trace of models built on our
blocks hold only standard aten ops in inference (kernels/plain.py), kernels.unfuse, and ``python -m widedeep.export``.

Models are width-1/16 ResNet-38s at 32x32 and small torchvision-style nets; BN statistics and gammas are
randomised (negative gammas included) so that a wrong BN formula cannot hide behind the identity init.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import kernels
from kernels.fuse import FusedSequential, _FusedChain
from widedeep.models import create_model

W = 1 / 16


def _randomise_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, (nn.BatchNorm2d, kernels.ABN)):
            c = m.num_features
            m.running_mean.copy_(torch.randn(c, generator=g) * 0.2)
            m.running_var.copy_(torch.rand(c, generator=g) * 1.5 + 0.5)
            with torch.no_grad():
                m.weight.copy_(torch.randn(c, generator=g) * 0.5 + 0.8)  # some negative
                m.bias.copy_(torch.randn(c, generator=g) * 0.2)
    return model


def _targets(ep) -> set[str]:
    return {str(n.target) for n in ep.graph.nodes if n.op == "call_function"}


def _no_custom_ops(targets: set[str]) -> bool:
    return not any("widedeep_kernels" in t for t in targets)


def _trace_kinds(traced) -> set[str]:
    return {n.kind() for n in traced.inlined_graph.nodes()}


def _scale_close(a: torch.Tensor, b: torch.Tensor, rel: float = 1e-5) -> None:
    """fp32: the fused eager path rounds differently from plain ops (a fused pass less); bounded by the scale."""
    tol = rel * max(1.0, float(b.abs().max()))
    assert float((a - b).abs().max()) <= tol, (float((a - b).abs().max()), tol)


# ---------------------------------------------------------------------------------------------------------------
# small torchvision-style nets: Sequential chains (DenseNet's transition) and a custom forward (F.relu(bn(x)))


class _DenseLayer(nn.Module):
    def __init__(self, c: int, growth: int):
        super().__init__()
        self.norm1, self.conv1 = nn.BatchNorm2d(c), nn.Conv2d(c, 2 * growth, 1, bias=False)
        self.norm2, self.relu2 = nn.BatchNorm2d(2 * growth), nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(2 * growth, growth, 3, padding=1, bias=False)

    def forward(self, x):
        y = self.conv1(F.relu(self.norm1(x)))
        return torch.cat([x, self.conv2(self.relu2(self.norm2(y)))], 1)


class TinyDenseNet(nn.Module):
    def __init__(self, classes: int = 5):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1, bias=False),
            _DenseLayer(8, 4),
            _DenseLayer(12, 4),
            nn.Sequential(nn.BatchNorm2d(16), nn.ReLU(inplace=True), nn.Conv2d(16, 8, 1, bias=False), nn.AvgPool2d(2)),
            nn.BatchNorm2d(8),
            nn.ReLU(),
        )
        self.classifier = nn.Linear(8, classes)

    def forward(self, x):
        return self.classifier(self.features(x).mean((2, 3)))


class TinyABNNet(nn.Module):
    """Mapillary style: conv -> InPlaceABN (leaky) -> conv -> ABN (relu) -> conv, and a 3-D (N, C, L) ABN."""

    def __init__(self):
        super().__init__()
        self.conv1, self.abn1 = nn.Conv2d(3, 8, 3, padding=1), kernels.InPlaceABN(8)
        self.conv2, self.abn2 = nn.Conv2d(8, 8, 3, padding=1), kernels.ABN(8, activation="relu")
        self.conv3 = nn.Conv2d(8, 4, 1)
        self.abn3 = kernels.InPlaceABN(4, activation="identity")

    def forward(self, x):
        y = self.conv3(self.abn2(self.conv2(self.abn1(self.conv1(x)))))
        return self.abn3(y.flatten(2)).view_as(y)


def _abn_reference(net: TinyABNNet, x: torch.Tensor) -> torch.Tensor:
    """The inplace_abn formulas in plain torch: InPlaceABN scales by |gamma| + eps, ABN by gamma."""

    def abn(m, t, absw):
        w = m.weight.abs() + m.eps if absw else m.weight
        z = F.batch_norm(t, m.running_mean, m.running_var, w, m.bias, False, 0.0, m.eps)
        return {"relu": F.relu, "identity": lambda v: v}.get(m.activation, lambda v: F.leaky_relu(v, 0.01))(z)

    y = net.conv3(abn(net.abn2, net.conv2(abn(net.abn1, net.conv1(x), True)), False))
    return abn(net.abn3, y.flatten(2), True).view_as(y)


# ---------------------------------------------------------------------------------------------------------------
# torch.export


@pytest.mark.parametrize("label", ["resnet38_a1", "voc_rna-a1_cls21_s8"])
def test_torch_export_of_fused_resnet38_holds_only_aten_ops(label):
    model = _randomise_bn(create_model(label, width=W, fused=True)).eval()
    plain = copy.deepcopy(model)
    assert kernels.unfuse(plain) == 1
    x = torch.randn(2, 3, 32, 32)
    ep = torch.export.export(model, (x,))
    targets = _targets(ep)
    assert _no_custom_ops(targets), targets
    assert any("batch_norm" in t for t in targets) and any("conv" in t for t in targets), targets
    with torch.no_grad():
        got, ref, fused = ep.module()(x), plain(x), model(x)
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-6)  # the same aten ops as the unfused model
    _scale_close(got, fused)


def test_torch_export_frozen_statistics_is_plain_and_training_keeps_custom_ops():
    model = _randomise_bn(create_model("resnet38_a1", width=W, fused=True))
    x = torch.randn(2, 3, 32, 32)
    model.freeze_bn_stats(True).train()  # the seed's use_global_stats: BN in eval, the model in training
    assert _no_custom_ops(_targets(torch.export.export(model, (x,))))
    model.freeze_bn_stats(False).train()  # batch statistics: the custom ops stay (documented choice)
    targets = _targets(torch.export.export(model, (x,)))
    assert any("widedeep_kernels.bn_stats" in t for t in targets), targets


# ---------------------------------------------------------------------------------------------------------------
# torch.jit.trace


def test_jit_trace_of_fused_model_in_eval_and_refusal_in_training():
    model = _randomise_bn(create_model("voc_rna-a1_cls21_s8", width=W, fused=True)).eval()
    plain = copy.deepcopy(model)
    kernels.unfuse(plain)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        traced = torch.jit.trace(model, (x,), check_trace=False)
        kinds = _trace_kinds(traced)
        assert "prim::PythonOp" not in kinds and not any("widedeep" in k for k in kinds), kinds
        assert "aten::batch_norm" in kinds and "aten::_convolution" in kinds
        x2 = torch.randn(2, 3, 32, 32)  # another input through the traced graph
        torch.testing.assert_close(traced(x2), plain(x2), rtol=0, atol=1e-6)
    model.train()
    with pytest.raises(RuntimeError, match=r"batch statistics \(training mode\).*model\.eval\(\)"):
        torch.jit.trace(model, (x,))


def test_jit_trace_and_export_of_inplace_abn_and_blocks():
    net = _randomise_bn(TinyABNNet()).eval()
    x = torch.randn(2, 3, 12, 12)
    with torch.no_grad():
        ref = _abn_reference(net, x)
        torch.testing.assert_close(net(x), ref, rtol=1e-5, atol=1e-5)
        traced = torch.jit.trace(net, (x,), check_trace=False)
        assert "prim::PythonOp" not in _trace_kinds(traced)
        torch.testing.assert_close(traced(x), ref, rtol=0, atol=1e-6)
    ep = torch.export.export(net, (x,))
    assert _no_custom_ops(_targets(ep))
    torch.testing.assert_close(ep.module()(x), ref, rtol=0, atol=1e-6)
    blocks = nn.Sequential(
        kernels.BNReLU(3, activation="leaky_relu", activation_param=0.2),
        kernels.BNReLUConv2d(3, 4, 3, padding=2, dilation=2),
    )
    _randomise_bn(blocks).eval()
    ep = torch.export.export(blocks, (x,))
    assert _no_custom_ops(_targets(ep))
    with torch.no_grad():
        _scale_close(ep.module()(x), blocks(x))


# ---------------------------------------------------------------------------------------------------------------
# unfuse


def test_unfuse_inverts_fuse_bn_relu_conv_in_place():
    torch.manual_seed(0)
    orig = _randomise_bn(TinyDenseNet()).double()
    model = copy.deepcopy(orig)
    assert kernels.fuse_bn_relu_conv(model) == 5  # the transition (a Sequential) + 2 traced chains per dense layer
    keys, tensors = list(model.state_dict()), [t.data_ptr() for t in model.state_dict().values()]
    assert any(isinstance(m, (FusedSequential, _FusedChain)) for m in model.modules())
    assert kernels.unfuse(model) == 2  # the Sequential, and the root whose forward became the rewritten graph
    assert kernels.unfuse(model) == 0
    assert not any(isinstance(m, (FusedSequential, _FusedChain)) for m in model.modules())
    assert not any("forward" in m.__dict__ for m in model.modules())
    assert [type(m) for m in model.modules()] == [type(m) for m in orig.modules()]
    assert list(model.state_dict()) == keys == list(orig.state_dict())
    assert [t.data_ptr() for t in model.state_dict().values()] == tensors  # the same tensors, in place
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    for mode in (True, False):  # the plain modules again: bit-identical to the never-fused model
        model.train(mode), orig.train(mode)
        torch.testing.assert_close(model(x), orig(x), rtol=0, atol=0)


def test_unfuse_of_fused_and_recompute_resnet38():
    model = create_model("voc_rna-a1_cls21_s8", width=W, fused=True, recompute="unit")
    keys = list(model.state_dict())
    assert kernels.unfuse(model) == 1
    assert model._fused_backend is None and model.recompute_plan is None
    assert all(u.backend is None and not u.recompute for u in model.units())
    assert list(model.state_dict()) == keys


# ---------------------------------------------------------------------------------------------------------------
# ONNX (onnx, onnxscript, onnxruntime: the test extra)


def _onnx_run(model: nn.Module, x: torch.Tensor, path) -> tuple[set[str], torch.Tensor]:
    onnx = pytest.importorskip("onnx")
    pytest.importorskip("onnxscript")
    ort = pytest.importorskip("onnxruntime")
    with torch.no_grad():
        torch.onnx.export(model, (x,), dynamo=True, opset_version=18).save(str(path))
    ops = {n.op_type for n in onnx.load(str(path)).graph.node}
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return ops, torch.from_numpy(sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0])


def test_onnx_of_fused_torchvision_style_model_and_inplace_abn(tmp_path):
    orig = _randomise_bn(TinyDenseNet()).eval()
    fused = copy.deepcopy(orig)
    assert kernels.fuse_bn_relu_conv(fused) == 5
    x = torch.randn(2, 3, 16, 16)
    ops, got = _onnx_run(fused, x, tmp_path / "dense.onnx")
    assert {"BatchNormalization", "Relu", "Conv"} <= ops and all(o in _STANDARD_ONNX for o in ops), ops
    with torch.no_grad():
        torch.testing.assert_close(got, orig(x), rtol=1e-4, atol=1e-5)
    net = _randomise_bn(TinyABNNet()).eval()
    ops, got = _onnx_run(net, x, tmp_path / "abn.onnx")  # |gamma| + eps: folded into the initializers
    assert {"BatchNormalization", "LeakyRelu", "Relu"} <= ops and all(o in _STANDARD_ONNX for o in ops), ops
    with torch.no_grad():
        torch.testing.assert_close(got, _abn_reference(net, x), rtol=1e-4, atol=1e-5)


_STANDARD_ONNX = {
    "BatchNormalization",
    "Relu",
    "LeakyRelu",
    "Conv",
    "Add",
    "Abs",
    "Concat",
    "ReduceMean",
    "Gemm",
    "MatMul",
    "AveragePool",
    "Reshape",
    "Flatten",
    "Transpose",
    "Constant",
    "Identity",
    "Shape",
    "Gather",
    "Unsqueeze",
    "Squeeze",
    "Cast",
    "Mul",
    "Div",
    "Sqrt",
    "Sub",
    "MaxPool",
    "Slice",
    "Expand",
}


@pytest.mark.parametrize(
    "label,extra",
    [
        ("resnet38_a1", ["--fused"]),
        ("voc_rna-a1_cls21_s8", ["--fused", "--dynamic-batch"]),
    ],
)
def test_export_cli_writes_checked_onnx(label, extra, tmp_path, capsys):
    pytest.importorskip("onnxscript")
    pytest.importorskip("onnxruntime")
    from widedeep.export import main

    out = tmp_path / "m.onnx"
    assert main([label, str(out), "--width", "0.0625", "--size", "32", "32", *extra]) == 0
    text = capsys.readouterr().out
    diff = float(text.split("max abs diff ")[1].split()[0])
    assert out.is_file() and diff < 1e-3, text
    assert not list(tmp_path.glob(".m.onnx.tmp-*"))


def test_export_cli_from_weights_file_and_errors(tmp_path, capsys):
    pytest.importorskip("onnxscript")
    pytest.importorskip("onnxruntime")
    import onnxruntime as ort

    from widedeep.export import main
    from widedeep.weights import save_weights

    model = _randomise_bn(create_model("resnet38d", width=W)).eval()
    wfile = tmp_path / "my_trunk.safetensors"
    save_weights(model, wfile)
    out = tmp_path / "trunk.onnx"
    assert main([str(wfile), str(out), "--label", "resnet38d", "--width", "0.0625", "--size", "24", "32"]) == 0
    sess = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    x = torch.randn(1, 3, 24, 32)
    with torch.no_grad():
        torch.testing.assert_close(
            torch.from_numpy(sess.run(None, {"image": x.numpy()})[0]), model(x), rtol=1e-4, atol=1e-4
        )
    capsys.readouterr()
    for argv, msg in (
        ([str(wfile), str(tmp_path / "x.onnx"), "--width", "0.0625"], "pass --label"),
        (["resnet38_a1", str(tmp_path / "x.txt")], "must end in .onnx"),
        ([str(tmp_path / "missing.params"), str(tmp_path / "x.onnx")], "not found"),
        (["nonsense", str(tmp_path / "x.onnx")], "model label 'nonsense'"),
    ):
        assert main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("python -m widedeep.export: error:") and msg in err and "\n" not in err, err
    assert not (tmp_path / "x.onnx").exists()


# ---------------------------------------------------------------------------------------------------------------
# torch.jit.script (ResNet-38: a scriptable view with the same modules; see widedeep/models/scriptable.py)


@pytest.mark.parametrize(
    "label,kw", [("voc_rna-a1_cls21_s8", {}), ("wider_resnet38_a2", dict(output_stride=8, global_pool="catavgmax"))]
)
def test_jit_script_of_fused_resnet38_equals_eager(label, kw):
    model = _randomise_bn(create_model(label, width=W, fused=True, **kw)).eval()
    scripted = torch.jit.script(model)
    assert list(scripted.state_dict()) == list(model.state_dict())
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        _scale_close(scripted(x), model(x))
    model.freeze_bn_stats(True).train()  # the scripted view keeps each module's own mode (frozen BN)
    scripted = torch.jit.script(model)
    assert scripted.training and not scripted.bn7.training


def test_onnx_export_in_training_mode_is_refused_with_our_line(tmp_path):
    pytest.importorskip("onnxscript")
    net = nn.Sequential(nn.BatchNorm2d(3), nn.ReLU(), nn.Conv2d(3, 4, 1))
    kernels.fuse_bn_relu_conv(net)
    net.train()  # batch statistics: no plain-op equivalent that ONNX runtimes would honour
    with pytest.raises(Exception, match=r"bn_relu_conv: a BatchNorm with batch statistics \(training mode\)"):
        torch.onnx.export(net, (torch.randn(2, 3, 4, 4),), dynamo=True)
    # (the TorchScript-based exporter, dynamo=False, switches the model to eval itself: plain ops, no refusal)
    torch.onnx.export(net, (torch.randn(2, 3, 4, 4),), str(tmp_path / "x.onnx"), dynamo=False)
    onnx = pytest.importorskip("onnx")
    assert {n.op_type for n in onnx.load(str(tmp_path / "x.onnx")).graph.node} >= {"BatchNormalization", "Conv"}
