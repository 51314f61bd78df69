"""Model zoo: labels, architecture (strides, dilations, pools, dropout), shapes, counts, timm-style surface."""

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from widedeep.models import ResNet38, create_model, model_args, parse_label
from widedeep.models.resnet38 import PreActUnit


@pytest.mark.parametrize(
    "label, expected",
    [
        ("ilsvrc-cls_rna-a1_cls1000", ("ilsvrc-cls", "a1", 1000, None, None)),
        ("ilsvrc-cls_rna-a1_cls1000_from-a", ("ilsvrc-cls", "a1", 1000, None, "from-a")),
        ("ilsvrc-cls_rna-a_cls1000_ep-0001.params", ("ilsvrc-cls", "a", 1000, None, None)),
        ("cityscapes_rna-a1_cls19_s8_x1-140", ("cityscapes", "a1", 19, 8, "x1-140")),
        ("output/cityscapes_rna-a1_cls19_s8_x1-140_ep-0064.params", ("cityscapes", "a1", 19, 8, "x1-140")),
        ("voc_rna-a1_cls21_s8_coco", ("voc", "a1", 21, 8, "coco")),
        ("ade20k_rna-a2_cls150_s16", ("ade20k", "a2", 150, 16, None)),
        ("voc_rna-a1_cls21_s8_s16net", ("voc", "a1", 21, 8, "s16net")),
    ],
)
def test_parse_label_forms(label, expected):
    lab = parse_label(label)
    assert (lab.dataset, lab.variant, lab.num_classes, lab.output_stride, lab.extra) == expected


@pytest.mark.parametrize(
    "bad",
    [
        "resnet50",
        "voc_rn-a1_cls21_s8",
        "voc_rna-b_cls21_s8",
        "moon_rna-a1_cls21_s8",
        "voc_rna-a1_cls21_s4",
        "voc_rna-a1_s8",
    ],
)
def test_bad_labels_are_refused_with_the_form(bad):
    with pytest.raises(ValueError, match=r"rna|dataset|variant|stride|form"):
        model_args(bad)


def test_segmentation_label_without_stride_is_refused_not_stride_32():
    with pytest.raises(ValueError, match="_s8"):
        model_args("voc_rna-a1_cls21")
    assert model_args("voc_rna-a1_cls21", output_stride=8)["output_stride"] == 8


def test_plain_names_and_overrides():
    assert model_args("resnet38_a")["variant"] == "a"
    assert model_args("wider_resnet38_a1")["variant"] == "a1"
    d = model_args("resnet38d")
    assert (d["output_stride"], d["num_classes"], d["dropout"]) == (8, 0, (0.3, 0.5))
    assert model_args("ilsvrc-cls_rna-a1_cls1000", num_classes=10)["num_classes"] == 10


def _n(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def test_parameter_counts_match_the_seed():
    cls = ResNet38("a1", 1000)
    assert _n(cls) == 109_167_912  # 109.17 M trainable
    assert sum(b.numel() for k, b in cls.named_buffers() if "running" in k) == 47_744  # 0.048 M BN statistics
    seg = ResNet38("a1", 21, 8, segmentation=True, dropout=(0.3, 0.5))
    assert abs(_n(seg) / 1e6 - 124.0) < 0.1
    assert _n(seg.head.conv6a) == 4096 * 512 * 9 + 512  # 18.9 M
    assert _n(ResNet38("a", 1000)) == _n(ResNet38("a2", 1000)) == _n(cls)


def test_psa_resnet38d_key_layout():
    keys = set(create_model("resnet38d").state_dict())
    assert len(keys) == 228
    for k in [
        "conv1a.weight",
        "b2.conv_branch1.weight",
        "b4_5.bn_branch2b1.running_var",
        "b6.bn_branch2b2.weight",
        "b7.conv_branch2b2.weight",
        "bn7.running_mean",
    ]:
        assert k in keys


def _unit(model, name) -> PreActUnit:
    return getattr(model, name)


def test_a1_stride8_dilations_follow_the_seed():
    m = create_model("voc_rna-a1_cls21_s8")
    assert [(_unit(m, u).conv_branch2a.stride[0]) for u in ("b2", "b3", "b4", "b5", "b6")] == [2, 2, 2, 1, 1]
    assert m.b5.conv_branch2a.dilation == (1, 1) and m.b5.conv_branch2b1.dilation == (2, 2)
    assert m.b5_2.conv_branch2a.dilation == (2, 2) and m.b5_2.conv_branch2a.padding == (2, 2)
    assert m.b6.conv_branch2a.kernel_size == (1, 1) and m.b6.conv_branch2b1.dilation == (4, 4)
    assert m.b7.conv_branch2b1.dilation == (4, 4) and m.b7.conv_branch2b1.padding == (4, 4)
    assert m.b6.spec.dropout == 0.3 and m.b7.spec.dropout == 0.5 and m.b5.spec.dropout == 0
    assert m.head.conv6a.dilation == (12, 12) and m.head.score.dilation == (12, 12)
    assert m.head.conv6a.bias is not None and m.b2.conv_branch2a.bias is None


def test_stride16_variants():
    a1 = ResNet38("a1", 1000, 16)
    assert a1.b5.conv_branch2a.stride == (2, 2) and a1.b6.conv_branch2a.stride == (1, 1)
    assert a1.b6.conv_branch2b1.dilation == (2, 2) and a1.b7.conv_branch2b1.dilation == (2, 2)
    a = ResNet38("a", 1000, 16)
    assert a.pool5.stride == 1 and a.pool4.stride == 2
    assert a.b6.conv_branch2b1.dilation == (2, 2) and a.b5.conv_branch2a.dilation == (1, 1)


def test_a2_pools_then_strides_and_a1_no_pools():
    a2 = ResNet38("a2", 1000)
    assert hasattr(a2, "pool1") and hasattr(a2, "pool2") and not hasattr(a2, "pool3")
    assert a2.b3.conv_branch2a.stride == (1, 1) and a2.b4.conv_branch2a.stride == (2, 2)
    assert a2.b6.conv_branch2a.stride == (2, 2) and a2.b6.conv_branch1.stride == (2, 2)
    a1 = ResNet38("a1", 1000)
    assert not any(isinstance(m, nn.MaxPool2d) for m in a1.modules())
    assert not any(isinstance(m, nn.Dropout) for m in a1.modules()) and all(u.spec.dropout == 0 for u in a1.units())


@pytest.mark.parametrize(
    "style, sizes224",
    [
        ("caffe", [111, 55, 27, 13, 6]),
        ("mxnet", [112, 56, 28, 14, 7]),
        ("ceil", [112, 56, 28, 14, 7]),
    ],
)
def test_model_a_pool_styles(style, sizes224):
    m = ResNet38("a", 1000, pool_style=style)
    x = torch.zeros(1, 1, 224, 224)
    got = []
    for i in range(1, 6):
        x = getattr(m, f"pool{i}")(x)
        got.append(x.shape[-1])
    assert got == sizes224


def _expected_size(n: int, model: ResNet38) -> int:
    for item in model.plan:
        if hasattr(item, "after_level"):
            if item.stride == 2:
                n = {"mxnet": (n - 1) // 2 + 1, "caffe": (n - 3) // 2 + 1, "ceil": math.ceil((n - 3) / 2) + 1}[
                    model.pool_style
                ]
        elif item.stride == 2:
            n = (n - 1) // 2 + 1
    return n


@pytest.mark.parametrize("variant", ["a", "a1", "a2"])
@pytest.mark.parametrize("stride", [8, 16, 32])
@pytest.mark.parametrize("seg", [False, True])
def test_output_shapes_at_odd_sizes(variant, stride, seg):
    m = ResNet38(variant, 5, stride, segmentation=seg, pool_style="caffe" if variant == "a" else "mxnet").eval()
    h, w = (83, 79) if variant == "a" else (45, 37)  # caffe pools need > 76 px to keep 1x1 at level 7
    x = torch.randn(2, 3, h, w)
    with torch.no_grad():
        y = m(x)
    if seg:
        assert y.shape == (2, 5, _expected_size(h, m), _expected_size(w, m))
    else:
        assert y.shape == (2, 5)


def test_timm_style_surface():
    m = create_model("resnet38_a1").eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        feats = m.forward_intermediates(x, intermediates_only=True)
        f = m.forward_features(x)
    assert [i["reduction"] for i in m.feature_info] == [1, 2, 4, 8, 16, 32]
    assert [t.shape[1] for t in feats] == [i["num_chs"] for i in m.feature_info] == [64, 128, 256, 512, 1024, 4096]
    assert [64 // t.shape[-1] for t in feats] == [1, 2, 4, 8, 16, 32]
    assert f.shape == (1, 4096, 2, 2) and (f >= 0).all()
    m.reset_classifier(7)
    assert m(x).shape == (1, 7) and m.get_classifier().out_features == 7
    seg = create_model("voc_rna-a1_cls21_s8").eval()
    seg.reset_classifier(3)
    assert seg(x).shape == (1, 3, 8, 8)
    d = create_model("resnet38d").eval()
    with torch.no_grad():
        out = d.forward_as_dict(x)
    assert out["conv4"].shape[1] == 512 and out["conv5"].shape[1] == 1024 and out["conv6"].shape == (1, 4096, 8, 8)


def test_channels_last_gives_the_same_scores():
    m = create_model("resnet38_a1").eval()
    x = torch.randn(2, 3, 40, 40)
    with torch.no_grad():
        ref = m(x)
        out = m.to(memory_format=torch.channels_last)(x.contiguous(memory_format=torch.channels_last))
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-3 * ref.abs().max().item())  # fp32 reassociation


def test_frozen_bn_statistics_survive_train_and_keep_gamma_trainable():
    m = create_model("voc_rna-a1_cls21_s8").freeze_bn_stats()
    m.train()
    before = m.b3.bn_branch2a.running_mean.clone()
    x = torch.randn(2, 3, 40, 40)
    m(x).sum().backward()
    assert torch.equal(m.b3.bn_branch2a.running_mean, before) and not m.b3.bn_branch2a.training
    assert m.b3.bn_branch2a.weight.grad is not None and m.b3.training
    fused = create_model("voc_rna-a1_cls21_s8", fused="torch").freeze_bn_stats()
    fused.load_state_dict(m.state_dict())
    for model in (m, fused):  # dropout off: compare the normalisation only
        for u in model.units():
            u.spec = type(u.spec)(**{**u.spec.__dict__, "dropout": 0.0})
    fused.train()
    torch.testing.assert_close(fused(x), m(x), rtol=1e-4, atol=1e-4 * m(x).abs().max().item())


@pytest.mark.parametrize("fused", [False, "torch"])
def test_forward_as_dict_runs_each_bn_once_and_stays_fused(fused, monkeypatch):
    """psa/SEAM's forward_as_dict: conv3 (SEAM), conv4, conv5, conv6; BN statistics updated once per call."""
    m = create_model("resnet38d", width=0.0625, fused=fused).train()
    ref = create_model("resnet38d", width=0.0625).train()
    ref.load_state_dict(m.state_dict())
    for model in (m, ref):  # no dropout: compare values
        for u in model.units():
            u.spec = type(u.spec)(**{**u.spec.__dict__, "dropout": 0.0})
    x = torch.randn(2, 3, 48, 48, dtype=torch.float64)
    m.double(), ref.double()
    calls = []
    if fused:
        import kernels

        real = kernels.bn_relu_conv
        monkeypatch.setattr(kernels, "bn_relu_conv", lambda *a, **k: calls.append(1) or real(*a, **k))
    out = m.forward_as_dict(x)
    assert set(out) == {"conv3", "conv4", "conv5", "conv6"}
    assert out["conv3"].shape[1] == m.b4.bn_branch2a.num_features and out["conv3"].shape[-1] == 12  # stride 4
    for name in ("b4", "b5", "b6", "b2"):
        assert int(getattr(m, name).bn_branch2a.num_batches_tracked) == 1, name  # once, not twice
    if fused:
        assert len(calls) > 20  # the other units and stages still run the fused kernels
    # the same values as psa's reference: relu(bn(x)) of the units' inputs, and features
    a = ref.conv1a(x)
    want = {}
    for name, unit in ref._body():
        if name in ("b4", "b5", "b6"):
            want[{"b4": "conv3", "b5": "conv4", "b6": "conv5"}[name]] = F.relu(unit.bn_branch2a(a))
        a = unit(a)
    want["conv6"] = F.relu(ref.bn7(a))
    for k in want:
        torch.testing.assert_close(out[k], want[k], rtol=1e-9, atol=1e-9)
    out["conv5"].sum().backward()  # gradients flow through the returned activations
    assert m.b6.bn_branch2a.weight.grad is not None
