"""Issue 16: the third ResNet-38 lineage (Mapillary InPlace-ABN / NVIDIA) loads exactly; leaky ReLU, Mapillary's
dilation of unit 5a's first 3x3, and the raw trunk output before bn7.

The checkpoints here are written from this file's own key lists and checked against this file's own plain-torch
forward of Mapillary's ``WiderResNet`` / ``WiderResNetA2`` (InPlace-ABN semantics: scale ``|gamma| + eps``, leaky
ReLU 0.01), not against our model or our key mapping. Width 1/16 keeps every net a few hundred kB.
"""

import logging

import pytest
import torch
import torch.nn.functional as F

from widedeep.models import ResNet38, build_plan, create_model
from widedeep.weights import (
    WeightsFormatError,
    WeightsMismatchError,
    load_weights,
    read_state_dict,
    read_weights,
    save_weights,
)

W = 1 / 16
EPS = 1e-5  # InPlace-ABN's and torch's default BN eps
SLOPE = 0.01  # InPlace-ABN's default leaky ReLU slope
STEM = 8  # 64 channels at width 1/16 (our rounding keeps at least 8)
STRUCTURE = [3, 3, 6, 3, 1, 1]  # blocks in mod2..mod7
CHANNELS = [(128, 128), (256, 256), (512, 512), (512, 1024), (512, 1024, 2048), (1024, 2048, 4096)]
CHANNELS = [tuple(c // 16 for c in widths) for widths in CHANNELS]
CLASSES = 10


# ------------------------------------------------------------------ Mapillary's key naming, written from the issue
def mapillary_state(*, classes: int = CLASSES, seed: int = 0, dtype=torch.float32, num_batches_tracked=False):
    """A seeded WiderResNet(A2)-38 state_dict in Mapillary's names (InPlaceABN >= 1.0: BN parameters directly on
    the ABN module). Gammas include negative values, so |gamma| matters; BN statistics are non-trivial."""
    g = torch.Generator().manual_seed(seed)

    def conv(cout, cin, k):
        return torch.randn(cout, cin, k, k, generator=g, dtype=torch.float64).mul_((2 / (cin * k * k)) ** 0.5)

    def bn(prefix, c):
        out = {
            f"{prefix}.weight": torch.empty(c, dtype=torch.float64).uniform_(-1.5, 1.5, generator=g),
            f"{prefix}.bias": torch.empty(c, dtype=torch.float64).uniform_(-0.2, 0.2, generator=g),
            f"{prefix}.running_mean": torch.empty(c, dtype=torch.float64).uniform_(-0.3, 0.3, generator=g),
            f"{prefix}.running_var": torch.empty(c, dtype=torch.float64).uniform_(0.5, 2.0, generator=g),
        }
        if num_batches_tracked:
            out[f"{prefix}.num_batches_tracked"] = torch.tensor(1000)
        return out

    s = {"mod1.conv1.weight": conv(STEM, 3, 3)}
    cin = STEM
    for mod_id, (num, widths) in enumerate(zip(STRUCTURE, CHANNELS)):
        for b in range(num):
            p = f"mod{mod_id + 2}.block{b + 1}"
            s.update(bn(f"{p}.bn1", cin))
            ks = (3, 3) if len(widths) == 2 else (1, 3, 1)
            c = cin
            for i, (w, k) in enumerate(zip(widths, ks)):
                if i:
                    s.update(bn(f"{p}.convs.bn{i + 1}", c))
                s[f"{p}.convs.conv{i + 1}.weight"] = conv(w, c, k)
                c = w
            if b == 0:
                s[f"{p}.proj_conv.weight"] = conv(widths[-1], cin, 1)
            cin = widths[-1]
    s.update(bn("bn_out", cin))
    if classes:
        s["classifier.fc.weight"] = torch.randn(classes, cin, generator=g, dtype=torch.float64) / cin**0.5
        s["classifier.fc.bias"] = torch.randn(classes, generator=g, dtype=torch.float64) * 0.1
    return {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in s.items()}


def with_infix(state, infix):
    """ABN v0.0.1 (``bn1.bn.weight``) or NVIDIA (``bn1.0.weight``): an infix before every BN parameter."""
    out = {}
    for k, v in state.items():
        head, param = k.rsplit(".", 1)
        is_bn = head.endswith(("bn1", "bn2", "bn3", "bn_out"))
        out[f"{head}.{infix}.{param}" if is_bn else k] = v
    return out


# ------------------------------------------------------------------ the reference: their forward in plain torch ops
def abn(x, s, prefix, *, inplace_abn: bool, slope=SLOPE):
    w = s[f"{prefix}.weight"]
    w = w.abs() + EPS if inplace_abn else w
    shape = (1, -1, 1, 1)
    y = (x - s[f"{prefix}.running_mean"].view(shape)) / torch.sqrt(s[f"{prefix}.running_var"].view(shape) + EPS)
    y = y * w.view(shape) + s[f"{prefix}.bias"].view(shape)
    return F.leaky_relu(y, slope) if slope is not None else F.relu(y)


def block(x, s, p, widths, stride, dilation, **kw):
    a = abn(x, s, f"{p}.bn1", **kw)
    shortcut = F.conv2d(a, s[f"{p}.proj_conv.weight"], stride=stride) if f"{p}.proj_conv.weight" in s else x
    if len(widths) == 2:
        t = F.conv2d(a, s[f"{p}.convs.conv1.weight"], stride=stride, padding=dilation, dilation=dilation)
        t = F.conv2d(
            abn(t, s, f"{p}.convs.bn2", **kw), s[f"{p}.convs.conv2.weight"], padding=dilation, dilation=dilation
        )
    else:
        t = F.conv2d(a, s[f"{p}.convs.conv1.weight"], stride=stride)
        t = F.conv2d(
            abn(t, s, f"{p}.convs.bn2", **kw), s[f"{p}.convs.conv2.weight"], padding=dilation, dilation=dilation
        )
        t = F.conv2d(abn(t, s, f"{p}.convs.bn3", **kw), s[f"{p}.convs.conv3.weight"])
    return t + shortcut


def reference(s, x, *, arch="a", dilation=False, inplace_abn=True, slope=SLOPE, until="logits"):
    """Mapillary's WiderResNet (``arch="a"``: max-pool 3x3/2 pad 1 before mod2..mod6) or WiderResNetA2 (pools before
    mod2, mod3; stride 2 in block1 of mod4..mod6, or with ``dilation`` only in mod4's, and dilation 2 in mod5 (all
    its 3x3s), 4 in mod6/mod7). ``until``: "mod7" (raw), "bn_out" (its ABN output) or "logits"."""
    kw = dict(inplace_abn=inplace_abn, slope=slope)
    out = F.conv2d(x, s["mod1.conv1.weight"], padding=1)
    for mod_id, (num, widths) in enumerate(zip(STRUCTURE, CHANNELS)):
        if (arch == "a" and mod_id < 5) or (arch == "a2" and mod_id < 2):
            out = F.max_pool2d(out, 3, 2, 1)
        for b in range(num):
            if arch == "a":
                stride, dil = 1, 1
            elif not dilation:
                stride, dil = (2 if b == 0 and 2 <= mod_id <= 4 else 1), 1
            else:
                stride, dil = (2 if b == 0 and mod_id == 2 else 1), (2 if mod_id == 3 else 4 if mod_id > 3 else 1)
            out = block(out, s, f"mod{mod_id + 2}.block{b + 1}", widths, stride, dil, **kw)
    if until == "mod7":
        return out
    out = abn(out, s, "bn_out", **kw)
    if until == "bn_out":
        return out
    return F.linear(out.mean(dim=(2, 3)), s["classifier.fc.weight"], s["classifier.fc.bias"])


def close(actual, expected):
    """Equal up to rounding: fp32 differs from fp64 by ~1e-6 of the largest value after 17 units (their op order
    and ours both round). fp64 files are read as fp32 since issue 21 (float64 is cast, with a note), so an fp64
    run agrees to fp32 rounding too (a logic error shows as 1e-2)."""
    rel = 4e-6
    torch.testing.assert_close(actual, expected, rtol=rel, atol=rel * expected.abs().max().item())


def x_like(dtype, size=(45, 38)):
    return torch.randn(2, 3, *size, generator=torch.Generator().manual_seed(1), dtype=dtype)


def _save(obj, path):
    torch.save(obj, path)
    return str(path)


# ------------------------------------------------------------------ the four layouts load exactly
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_mapillary_imagenet_file_with_module_prefix_and_optimizer(tmp_path, dtype, caplog):
    """Mapillary's ImageNet file: WiderResNet (= Model A) saved from InPlaceABN under DataParallel."""
    s = mapillary_state(dtype=dtype)
    ckpt = {
        "state_dict": {f"module.{k}": v for k, v in s.items()},
        "optimizer": {"state": {0: {"momentum_buffer": torch.zeros(3)}}, "param_groups": [{"lr": 0.1}]},
    }
    path = _save(ckpt, tmp_path / "wider_resnet38.pth.tar")
    with caplog.at_level(logging.INFO, logger="widedeep"):
        if dtype == torch.float32:
            model = create_model(
                "wider_resnet38", num_classes=CLASSES, width=W, weights=path, weights_convention="inplace_abn"
            ).eval()
        else:  # an fp64 model first, so nothing is rounded to fp32 on the way
            model = create_model("wider_resnet38", num_classes=CLASSES, width=W).double().eval()
            report = load_weights(model, path, weights_convention="inplace_abn")
            assert report.layout == "mapillary" and report.convention == "inplace_abn"
            assert report.skipped == {"optimizer": "optimiser state (not weights)"}
    assert "skipped optimizer: optimiser state" in caplog.text  # reported, not silently dropped
    x = x_like(dtype)
    with torch.no_grad():
        close(model(x), reference(s, x, arch="a"))
        close(model.forward_features(x, bn7=False), reference(s, x, until="mod7"))


@pytest.mark.parametrize("inplace_abn", [True, False])
def test_v001_bn_infix(tmp_path, inplace_abn):
    """InPlace-ABN v0.0.1: ABN = Sequential(bn=BatchNorm2d, act), keys ``bn1.bn.weight``; either convention."""
    s = mapillary_state(seed=2, num_batches_tracked=True)
    path = _save({"state_dict": {f"module.{k}": v for k, v in with_infix(s, "bn").items()}}, tmp_path / "v0.pth")
    wf = read_weights(path, weights_convention="inplace_abn" if inplace_abn else "plain")
    assert wf.layout == "mapillary-v0" and wf.skipped == {}
    model = create_model("wider_resnet38", num_classes=CLASSES, width=W, weights=wf).eval()
    assert model.b4_5.bn_branch2b1.num_batches_tracked == 1000
    x = x_like(torch.float32)
    with torch.no_grad():
        close(model(x), reference(s, x, inplace_abn=inplace_abn))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_vistas_body_dilated_a2(tmp_path, dtype, caplog):
    """A Vistas file: WiderResNetA2(dilation=True) body + DeepLabV3 head + cls conv; the head and cls are reported."""
    s = mapillary_state(classes=0, seed=4, dtype=dtype)
    head = {
        "map_convs.0.weight": torch.zeros(4, 256, 1, 1),
        "map_bn.weight": torch.ones(4),
        "red_conv.weight": torch.zeros(4, 4, 1, 1),
    }
    ckpt = {
        "state_dict": {"body": s, "head": head, "cls": {"weight": torch.zeros(65, 4, 1, 1), "bias": torch.zeros(65)}}
    }
    path = _save(ckpt, tmp_path / "wide_resnet38_deeplab_vistas.pth.tar")
    kw = dict(output_stride=8, num_classes=0, width=W)
    with caplog.at_level(logging.WARNING, logger="widedeep"):
        if dtype == torch.float32:
            model = create_model("wider_resnet38_a2", **kw, weights=path, weights_convention="inplace_abn")
        else:
            model = create_model("wider_resnet38_a2", **kw).double()
            report = load_weights(model, path, weights_convention="inplace_abn")
            assert report.layout == "mapillary-vistas" and not report.missing and not report.unexpected
            assert set(report.skipped) == {"state_dict.head", "state_dict.cls"}
            assert "DeepLabV3" in report.skipped["state_dict.head"] and "3 tensors" in report.skipped["state_dict.head"]
    assert "skipped state_dict.head" in caplog.text and "skipped state_dict.cls" in caplog.text
    model.eval()
    x = x_like(dtype, (41, 50))
    with torch.no_grad():
        feats = model.forward_features(x)
        assert feats.shape == (2, 256, 6, 7)  # output stride 8
        close(feats, reference(s, x, arch="a2", dilation=True, until="bn_out"))
        raw = model.forward_features(x, bn7=False)
        close(raw, reference(s, x, arch="a2", dilation=True, until="mod7"))
        # ademxapp's A2-s8 keeps unit 5a's first 3x3 undilated: the same weights then give other outputs
        ademxapp_style = create_model("wider_resnet38_a2", **kw, dilate_first_conv=False).to(dtype).eval()
        ademxapp_style.load_state_dict(model.state_dict())
        assert (ademxapp_style.forward_features(x) - feats).abs().max() > 1e-3


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_nvidia_file_plain_bn_and_raw_trunk(tmp_path, dtype):
    """NVIDIA's wider_resnet38.pth.tar: ``module.`` + ``.0.`` (BN in Sequential(BatchNorm2d, ReLU)), plain BN
    gammas, num_batches_tracked; their DeepWV3Plus trunk is the A2 dilated net and feeds the raw mod7 output on."""
    s = mapillary_state(seed=6, dtype=dtype, num_batches_tracked=True)
    path = _save(
        {"state_dict": {f"module.{k}": v for k, v in with_infix(s, "0").items()}}, tmp_path / "wider_resnet38.pth.tar"
    )
    wf = read_weights(path)  # no convention: NVIDIA's layout is plain BN, no warning either
    assert wf.layout == "nvidia" and wf.convention is None
    model = create_model("wider_resnet38", num_classes=CLASSES, width=W).to(dtype).eval()
    load_weights(model, wf)
    x = x_like(dtype)
    with torch.no_grad():
        close(model(x), reference(s, x, inplace_abn=False))
    # NVIDIA's DeepWV3Plus: WiderResNetA2(dilation=True) and ReLU (an initialisation from these weights)
    trunk = create_model("wider_resnet38_a2", output_stride=8, num_classes=CLASSES, width=W, activation="relu")
    load_weights(trunk.to(dtype).eval(), wf)
    with torch.no_grad():
        ref = reference(s, x, arch="a2", dilation=True, inplace_abn=False, slope=None, until="mod7")
        close(trunk.forward_features(x, bn7=False), ref)
        final, feats = trunk.forward_intermediates(x, bn7=False)
        close(final, ref)
        close(feats[-1], ref)
        assert len(feats) == 6


def test_mapillary_keys_in_a_state_dict_and_safetensors(tmp_path):
    """The layouts are told from keys, not file names or suffixes: a torch.load'ed dict and a .safetensors too."""
    s = mapillary_state(seed=8)
    model = create_model("wider_resnet38", num_classes=CLASSES, width=W).eval()
    report = load_weights(
        model, {"state_dict": {f"module.{k}": v for k, v in s.items()}}, weights_convention="inplace_abn"
    )
    assert report.layout == "mapillary" and report.convention == "inplace_abn"
    x = x_like(torch.float32)
    with torch.no_grad():
        close(model(x), reference(s, x))
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in s.items()}, str(tmp_path / "m.safetensors"))
    state = read_state_dict(tmp_path / "m.safetensors", weights_convention="inplace_abn")
    assert set(state) == {k for k in model.state_dict() if not k.endswith("num_batches_tracked")}
    assert torch.equal(state["b4_3.bn_branch2b1.weight"], s["mod4.block4.convs.bn2.weight"].abs() + EPS)
    assert torch.equal(state["b4_3.bn_branch2b1.bias"], s["mod4.block4.convs.bn2.bias"])
    assert torch.equal(
        read_state_dict(tmp_path / "m.safetensors", weights_convention="plain")["bn7.weight"], s["bn_out.weight"]
    )
    # converted back into ours, it is a plain file: saved and reloaded it gives the same outputs
    save_weights(model, tmp_path / "ours.safetensors")
    back = create_model("wider_resnet38", num_classes=CLASSES, width=W, weights=str(tmp_path / "ours.safetensors"))
    with torch.no_grad():
        assert torch.equal(back.eval()(x), model(x))


# ------------------------------------------------------------------ errors and warnings say what to do
def test_convention_warnings_and_errors(tmp_path, caplog):
    s = mapillary_state(seed=9)
    path = _save({"state_dict": s}, tmp_path / "m.pth")
    with caplog.at_level(logging.WARNING, logger="widedeep"):
        create_model("wider_resnet38", num_classes=CLASSES, width=W, weights=path)
    assert "weights_convention='inplace_abn'" in caplog.text  # undecided: says which to try
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="widedeep"):
        create_model("wider_resnet38", num_classes=CLASSES, width=W, weights=path, weights_convention="plain")
    assert caplog.text == ""
    with pytest.raises(ValueError, match=r"weights_convention must be None, 'plain' or 'inplace_abn', got 'abs'"):
        read_weights(path, weights_convention="abs")
    ours = tmp_path / "ours.pth"
    save_weights(create_model("resnet38_a1", width=W), ours)
    with pytest.raises(WeightsFormatError, match=r"ours.pth.*plain: drop the option"):
        read_weights(ours, weights_convention="inplace_abn")
    wf = read_weights(path, weights_convention="inplace_abn")
    with pytest.raises(ValueError, match="already converted"):
        create_model("wider_resnet38", num_classes=CLASSES, width=W, weights=wf, weights_convention="plain")


def test_lineage_mismatch_warnings(tmp_path, caplog):
    s = mapillary_state(seed=10)
    path = _save({"state_dict": s}, tmp_path / "m.pth")
    with caplog.at_level(logging.INFO, logger="widedeep"):
        create_model("resnet38_a", num_classes=CLASSES, width=W, weights=path, weights_convention="inplace_abn")
    assert "activation='leaky_relu'" in caplog.text and "bn_eps=1e-5" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="widedeep"):  # the ImageNet file (Model A) into A2: warned
        create_model("wider_resnet38_a2", num_classes=CLASSES, width=W, weights=path, weights_convention="plain")
    assert "WiderResNet = Model A" in caplog.text and "initialisation" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="widedeep"):  # NVIDIA-style fine-tuning, said explicitly: quiet
        create_model(
            "wider_resnet38_a2",
            num_classes=CLASSES,
            width=W,
            weights=path,
            weights_convention="plain",
            activation="relu",
        )
    assert caplog.text == ""
    body = _save({"state_dict": {"body": mapillary_state(classes=0), "head": {}}}, tmp_path / "vistas.pth")
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="widedeep"):
        create_model("wider_resnet38_a2", num_classes=0, width=W, weights=body, weights_convention="plain")
    assert "output_stride=8" in caplog.text


def test_layout_errors_name_the_file_and_fix(tmp_path):
    s = mapillary_state(seed=11, classes=0)
    path = _save(s, tmp_path / "body.pth")
    with pytest.raises(WeightsMismatchError, match=r"body.pth.*no classifier.*num_classes=0"):
        create_model("wider_resnet38", width=W, weights=path, weights_convention="plain")
    bad = dict(s)
    bad["mod2.block1.convs.bn2.gamma"] = bad.pop("mod2.block1.convs.bn2.weight")
    with pytest.raises(WeightsMismatchError, match=r"bad.pth: 1 keys of a Mapillary/NVIDIA.*convs.bn2.gamma"):
        read_weights(_save(bad, tmp_path / "bad.pth"))
    short = {k: v for k, v in s.items() if not k.startswith("mod4.block6.")}  # wider_resnet with 5 blocks in mod4
    with pytest.raises(WeightsMismatchError, match=r"structure \[3, 3, 5, 3, 1, 1\]"):
        read_weights(_save(short, tmp_path / "short.pth"))
    # NVIDIA's DeepWV3Plus keeps no bn_out; its ASPP etc. are reported, bn7 is the only thing missing
    nv = {f"module.{k}": v for k, v in with_infix(s, "0").items() if not k.startswith("bn_out")}
    nv["module.aspp.features.0.weight"] = torch.zeros(2, 2)
    nv_path = _save({"state_dict": nv}, tmp_path / "deepwv3plus.pth")
    with pytest.raises(WeightsMismatchError, match=r"bn7.*weights_strict=False.*bn7=False"):
        create_model("wider_resnet38_a2", output_stride=8, num_classes=0, width=W, weights=nv_path)
    m = create_model(
        "wider_resnet38_a2", output_stride=8, num_classes=0, width=W, weights=nv_path, weights_strict=False
    )
    report = load_weights(m, nv_path, strict=False)
    assert report.skipped == {"aspp.*": "1 tensors of a segmentation head (no counterpart in ResNet38)"}
    assert sorted(report.missing) == ["bn7.bias", "bn7.running_mean", "bn7.running_var", "bn7.weight"]


# ------------------------------------------------------------------ model options
def test_convert_writes_plain_bn_values(tmp_path):
    """python -m widedeep.convert --weights-convention inplace_abn: the written file loads exactly, no option needed."""
    from widedeep.convert import cli

    s = mapillary_state(classes=1000)
    src = _save({"state_dict": {f"module.{k}": v for k, v in s.items()}}, tmp_path / "wider_resnet38.pth.tar")
    out = tmp_path / "plain.safetensors"
    assert (
        cli([src, str(out), "--label", "wider_resnet38", "--width", str(W), "--weights-convention", "inplace_abn"]) == 0
    )
    model = create_model("wider_resnet38", width=W, weights=str(out)).eval()
    x = x_like(torch.float32)
    with torch.no_grad():
        close(model(x), reference(s, x, arch="a"))


def test_dilate_first_conv_plan():
    def dil(**kw):
        return {u.module: u.dilations for u in build_plan("a2", 8, **kw) if hasattr(u, "module")}

    ours, theirs = dil(), dil(dilate_first_conv=True)
    assert ours["b5"] == (1, 2) and theirs["b5"] == (2, 2)
    assert {k: v for k, v in ours.items() if k != "b5"} == {k: v for k, v in theirs.items() if k != "b5"}
    assert build_plan("a1", 32, dilate_first_conv=True) == build_plan("a1", 32)  # nothing dilated: no effect


def test_leaky_relu_everywhere_unfused():
    """Each BN's activation is the leaky one: units, bn7, forward_as_dict; create_model passes the options on."""
    m = create_model("voc_rna-a1_cls21_s8", width=W, activation="leaky_relu", activation_param=0.2).eval()
    assert all(u.activation == "leaky_relu" and u.activation_param == 0.2 for u in m.units())
    x = x_like(torch.float32, (24, 24))
    with torch.no_grad():
        d = m.forward_as_dict(x)
        raw = m.forward_features(x, bn7=False)
        torch.testing.assert_close(d["conv6"], F.leaky_relu(m.bn7(raw), 0.2))
        assert (d["conv6"] < 0).any()
        relu = create_model("voc_rna-a1_cls21_s8", width=W).eval()
        relu.load_state_dict(m.state_dict())
        assert not torch.allclose(relu(x), m(x))
        m.set_activation("relu")
        torch.testing.assert_close(m(x), relu(x), rtol=0, atol=0)
    with pytest.raises(ValueError, match="activation must be one of"):
        ResNet38("a1", width=W, activation="gelu")


@pytest.mark.parametrize(
    "name,mode", [("wider_resnet38", "fused"), ("wider_resnet38_a2", "fused"), ("wider_resnet38_a2", "unit")]
)
def test_leaky_fused_equals_unfused_fp64(name, mode):
    """fp64: the fused kernels' leaky ReLU (forward, recomputed backward, bn7 folded into the segmentation head's
    first conv) equals F.leaky_relu; ``"unit"`` re-runs whole units in backward."""
    kw = (
        dict(width=W, num_classes=CLASSES)
        if name == "wider_resnet38"
        else dict(width=W, output_stride=8, segmentation=True, num_classes=3)
    )
    plain = create_model(name, **kw).double().train()
    fused = create_model(name, fused="torch", recompute="unit" if mode == "unit" else None, **kw).double().train()
    fused.load_state_dict(plain.state_dict())
    x = x_like(torch.float64, (40, 36))
    y, yf = plain(x), fused(x)
    torch.testing.assert_close(yf, y, rtol=1e-9, atol=1e-9)
    y.square().sum().backward()
    yf.square().sum().backward()
    for (k, p), q in zip(plain.named_parameters(), fused.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-7, atol=1e-9 * p.grad.abs().max().item(), msg=k)
    with torch.no_grad():  # eval: running statistics, also through forward_as_dict's materialised activations
        plain.eval(), fused.eval()
        for k, v in plain.forward_as_dict(x).items():
            torch.testing.assert_close(fused.forward_as_dict(x)[k], v, rtol=1e-9, atol=1e-9)


def test_leaky_fused_triton_interpreted_matches_mapillary_reference(tmp_path):
    s = mapillary_state(seed=12, classes=0)
    path = _save({"state_dict": {"body": s}}, tmp_path / "vistas.pth")
    model = create_model(
        "wider_resnet38_a2",
        output_stride=8,
        num_classes=0,
        width=W,
        fused="triton",
        weights=path,
        weights_convention="inplace_abn",
    ).eval()
    x = x_like(torch.float32, (32, 32))[:1]
    with torch.no_grad():
        ref = reference(s, x, arch="a2", dilation=True, until="bn_out")
        torch.testing.assert_close(model.forward_features(x), ref, rtol=1e-4, atol=1e-4 * ref.abs().max().item())
