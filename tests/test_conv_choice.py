"""Per-layer conv choice (kernels/conv_choice.py): the shipped table, overrides, and bn_relu_conv(conv="auto")."""

import json

import pytest
import torch
import torch.nn as nn

import kernels
from kernels import conv as kc
from kernels import conv_choice as cc

H100 = "NVIDIA H100 80GB HBM3"


def _table(*entries, default="torch"):
    return {"format": cc.FORMAT, "version": 1, "default": default, "entries": list(entries)}


def _entry(impl, **kw):
    e = dict(device=H100, dtype="bf16", N=4, C=64, K=128, H=56, W=56, k=3, stride=2, pad=1, dil=1, impl=impl)
    e.update(kw)
    return e


def test_shipped_table_is_valid_and_keyed_by_device_and_shape():
    t = cc.load_table(cc.SHIPPED)
    assert t["default"] == "torch" and t["entries"], "the shipped table is empty"
    for key, impl in t["entries"].items():
        assert len(key) == len(cc.KEY_FIELDS) and impl in cc.IMPLS and key[0]  # a named device
    raw = json.loads(cc.SHIPPED.read_text())["entries"]
    assert all(
        "ours_ms" in e and "cudnn_ms" in e and (e["impl"] == "triton") == (e["ours_ms"] < e["cudnn_ms"]) for e in raw
    ), "each entry states the measurement it was chosen from"


def test_lookup_override_first_then_shipped_then_default(tmp_path):
    conv = nn.Conv2d(64, 128, 3, 2, 1, bias=False)
    x = torch.empty(4, 64, 56, 56, device="meta")
    key = cc.shape_key(x, conv, torch.bfloat16, H100)
    assert key == (H100, "bf16", 4, 64, 128, 56, 56, 3, 2, 1, 1)
    with cc.use_table(_table(_entry("triton"))):
        assert cc.lookup(key) == "triton"
        assert cc.lookup(key[:1] + ("fp16",) + key[2:]) == "torch"  # another dtype: the default
        assert cc.lookup(("NVIDIA A100-SXM4-80GB",) + key[1:]) == "torch"  # another device
    f = tmp_path / "mine.json"
    f.write_text(json.dumps(_table(_entry("triton"), default="triton")))
    try:
        cc.set_table(f)
        assert cc.lookup(key) == "triton" and cc.lookup(key[:2] + (8,) + key[3:]) == "triton"  # its default
    finally:
        cc.set_table(None)


@pytest.mark.parametrize(
    "content, msg",
    [
        ("{", "not valid JSON"),
        ('{"format": "other"}', "not a conv choice table"),
        (json.dumps(_table(_entry("cudnn"))), "impl must be one of"),
        (json.dumps(_table({"device": H100, "impl": "torch"})), "lacks"),
        (json.dumps(_table(_entry("torch", N="4"))), "must be an integer"),
    ],
)
def test_bad_table_file_names_the_file(tmp_path, content, msg):
    f = tmp_path / "bad.json"
    f.write_text(content)
    with pytest.raises(ValueError, match=msg) as e:
        cc.load_table(f)
    assert str(f) in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(ValueError, match="cannot read"):
        cc.load_table(tmp_path / "missing.json")


def test_choose_is_torch_off_cuda():
    x = torch.randn(1, 4, 5, 5)
    with cc.use_table(_table(default="triton")):
        assert cc.choose(x, [nn.Conv2d(4, 4, 3)], torch.float32) == "torch"


@pytest.mark.parametrize("pick", ["triton", "torch"])
def test_bn_relu_conv_auto_follows_the_choice(monkeypatch, pick):
    """conv="auto": the implicit GEMMs run where the choice says "triton" (values still equal torch's), cuDNN else."""
    calls = []
    real = kc.conv_fprop
    monkeypatch.setattr(kc, "conv_fprop", lambda *a, **k: calls.append(1) or real(*a, **k))
    monkeypatch.setattr(cc, "choose", lambda x, convs, dtype: pick)
    torch.manual_seed(0)
    bn, conv = nn.BatchNorm2d(4), nn.Conv2d(4, 6, 3, 2, 1)
    x = torch.randn(2, 4, 7, 6)
    y = kernels.bn_relu_conv(x, bn, [conv], backend="triton", conv="auto")[0]
    bn2 = nn.BatchNorm2d(4)
    ref = conv(torch.relu(bn2(x)))
    torch.testing.assert_close(y, ref, rtol=1e-4, atol=1e-4)
    assert len(calls) == (1 if pick == "triton" else 0)
    block = kernels.BNReLUConv2d(4, 6, 3, 2, 1, backend="triton", conv_impl="auto")
    calls.clear()
    block(x)
    assert len(calls) == (1 if pick == "triton" else 0)
    # dropout cannot run on the implicit GEMM: auto falls back to cuDNN instead of refusing
    calls.clear()
    kernels.bn_relu_conv(x, bn, [conv], dropout=0.5, backend="triton", conv="auto")
    assert not calls


def test_table_from_campaign_rows_cli(tmp_path):
    rows = [
        dict(
            C=64,
            K=128,
            k=3,
            stride=2,
            dil=1,
            pad=1,
            H=56,
            W=56,
            N=4,
            dtype="bfloat16",
            ours_fprop_ms=1.0,
            ours_dgrad_ms=1.0,
            ours_wgrad_ms=1.0,
            cudnn_fprop_ms=0.5,
            cudnn_dgrad_ms=0.5,
            cudnn_wgrad_ms=0.5,
        ),
        dict(
            C=64,
            K=64,
            k=1,
            stride=1,
            dil=1,
            pad=0,
            H=56,
            W=56,
            N=4,
            dtype="bfloat16",
            igemm_ms=0.2,
            bnrelu_cudnn_ms=0.3,
        ),
        dict(C=8, K=8, k=1, stride=1, dil=1, pad=0, H=7, W=7, N=4, dtype="bfloat16", timed=False),
    ]
    src = tmp_path / "campaign.json"
    src.write_text(json.dumps({"environment": {"device": H100}, "kernels": {"conv": {"rows": rows}}}))
    out = tmp_path / "table.json"
    assert cc.main(["--from", str(src), "--out", str(out)]) == 0
    t = cc.load_table(out)
    assert sorted(t["entries"].values()) == ["torch", "triton"] and len(t["entries"]) == 2  # untimed row left out
    assert t["entries"][(H100, "bf16", 4, 64, 64, 56, 56, 1, 1, 0, 1)] == "triton"
    src.write_text("[]")
    assert cc.main(["--from", str(src), "--out", str(out)]) == 2
    assert cc.load_table(out)["entries"]  # the old table is intact


def test_table_from_conv_shapes_results_merges(tmp_path):
    """bench.conv_shapes' results file ("results" rows) merged into a table that holds another device's entry."""
    out = tmp_path / "table.json"
    other = _entry("triton", device="NVIDIA A100-SXM4-80GB")
    out.write_text(json.dumps(_table(other)))
    src = tmp_path / "shapes.json"
    row = dict(
        C=64, K=128, k=3, stride=2, dil=1, pad=1, H=56, W=56, N=4, dtype="bf16", igemm_ms=2.0, bnrelu_cudnn_ms=1.0
    )
    src.write_text(json.dumps({"environment": {"device": H100}, "results": [row]}))
    assert cc.main(["--from", str(src), "--out", str(out), "--merge"]) == 0
    t = cc.load_table(out)["entries"]
    assert t[(H100, "bf16", 4, 64, 128, 56, 56, 3, 2, 1, 1)] == "torch"
    assert t[tuple(other[f] for f in cc.KEY_FIELDS)] == "triton"


def test_model_conv_impl_auto_follows_the_table_per_layer(monkeypatch):
    """create_model(fused="triton", conv_impl="auto"): every BN-ReLU-conv call (a unit's stage, its projection
    shortcut included, and the head's conv6a) runs the implicit GEMM exactly where the table says "triton" for all
    of that call's convs, cuDNN/torch elsewhere; values and gradients equal the plain model (A1-s8 width 1/16 in
    fp32 under the interpreter, tolerances of tests/test_fused_model.py: 1e-4 of each tensor's largest magnitude).
    The table is keyed by shape, so layers of one shape (b5_1 and b5_2) go together."""
    from widedeep.models import create_model

    torch.manual_seed(0)
    plain = create_model("voc_rna-a1_cls21_s8", dropout=None, width=0.0625).train()
    auto = create_model("voc_rna-a1_cls21_s8", dropout=None, width=0.0625, fused="triton", conv_impl="auto").train()
    auto.load_state_dict(plain.state_dict())
    x = torch.randn(1, 3, 48, 48)
    keys, hooks = {}, []  # conv module name -> its table key (input shape seen in the plain model)
    for name, m in plain.named_modules():
        if isinstance(m, nn.Conv2d):
            hooks.append(
                m.register_forward_pre_hook(
                    lambda mod, inp, name=name: keys.__setitem__(name, cc.shape_key(inp[0], mod, torch.float32, "cpu"))
                )
            )
    y = plain(x)
    for h in hooks:
        h.remove()
    want_triton = {"b2.conv_branch2a", "b5_1.conv_branch2a", "b7.conv_branch2a", "b7.conv_branch1", "head.conv6a"}
    entries = [dict(zip(cc.KEY_FIELDS, keys[n]), impl="triton") for n in sorted(want_triton)]
    # the calls: (stage convs) per unit stage, then the head; "triton" only where all of a call's convs are
    calls = [
        [f"{un}.conv_{u.stages[i]}"] + ([f"{un}.conv_branch1"] if i == 0 and u.spec.projection else [])
        for un, u in auto.named_children()
        if hasattr(u, "stages")
        for i in range(len(u.stages))
    ]
    calls.append(["head.conv6a"])
    triton_keys = {keys[n] for n in want_triton}
    expected = sorted(n for call in calls if all(keys[c] in triton_keys for c in call) for n in call)
    assert "b2.conv_branch2a" not in expected  # its projection shortcut stays torch: the call stays torch
    assert {"b5_2.conv_branch2a", "head.conv6a", "b7.conv_branch1"} <= set(expected)
    names = {id(m.weight): n for n, m in auto.named_modules() if isinstance(m, nn.Conv2d)}
    seen = []
    real = kc.conv_fprop
    monkeypatch.setattr(kc, "conv_fprop", lambda xx, w, *a, **k: seen.append(names[id(w)]) or real(xx, w, *a, **k))
    with cc.use_table(_table(*entries)), cc.lookup_off_cuda():
        ya = auto(x)
    assert sorted(seen) == expected
    torch.testing.assert_close(ya, y, rtol=1e-4, atol=1e-4 * y.abs().max().item())
    y.logsumexp(1).sum().backward()
    ya.logsumexp(1).sum().backward()
    for (k, p), q in zip(plain.named_parameters(), auto.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-4, atol=1e-4 * p.grad.abs().max().item(), msg=k)
    with pytest.raises(ValueError, match="conv_impl must be"):
        auto.set_conv_impl("cudnn")
