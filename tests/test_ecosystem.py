"""The ecosystem for real: timm, segmentation_models_pytorch and torchvision models; kernels.BNReLUConv2d as a drop-in.

timm needs torchvision, and the torchvision pip picks does not import beside the CPU torch 2.13.0 of the main
environment, so the timm/smp/torchvision tests run their body in a side venv with a matching pair
(``WIDEDEEP_ECO_PYTHON``, default /opt/widedeep-eco/bin/python; ``.ci/run`` creates it). Without it they skip,
except under ``WIDEDEEP_REQUIRE_ECO=1`` (CI), where they fail. The BNReLUConv2d tests run here.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn as nn

import kernels

REPO = Path(__file__).resolve().parents[1]
ECO_PYTHON = os.environ.get("WIDEDEEP_ECO_PYTHON", "/opt/widedeep-eco/bin/python")
ECO_INSTALL = (
    "python3 -m venv /opt/widedeep-eco && /opt/widedeep-eco/bin/pip install torch==2.14.1 "
    "torchvision==0.29.1 timm segmentation_models_pytorch numpy pillow safetensors tqdm"
)


def run_eco(body: str, tmp_path: Path, timeout: int = 300) -> str:
    """Run ``body`` with the side venv's Python (repo on PYTHONPATH, cwd tmp_path); returns its stdout."""
    if not os.path.exists(ECO_PYTHON):
        msg = f"the timm/smp side venv is missing ({ECO_PYTHON}); create it with: {ECO_INSTALL}"
        if os.environ.get("WIDEDEEP_REQUIRE_ECO") == "1":
            pytest.fail(msg)
        pytest.skip(msg)
    path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)
    env = {**os.environ, "PYTHONPATH": path}
    prologue = "import warnings, torch, widedeep\nwarnings.simplefilter('ignore', UserWarning)\ntorch.manual_seed(0)\n"
    r = subprocess.run(
        [ECO_PYTHON, "-c", prologue + textwrap.dedent(body)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert r.returncode == 0, f"side-venv script failed ({r.returncode}):\n{r.stdout[-3000:]}\n{r.stderr[-6000:]}"
    return r.stdout


def test_timm_create_model_features_match_timm_conventions(tmp_path):
    """Every keyword timm passes (incl. cache_dir, pretrained_cfg*); features_only/out_indices give timm's wrapper
    with feature_info like timm's resnet (channels, reduction, module per index; negative indices);
    drop_rate/global_pool; pretrained_cfg describes the released file (no url); resnet38d is stride 8."""
    run_eco(
        """
        import timm
        x = torch.randn(2, 3, 64, 64)
        ref = timm.create_model("resnet18", features_only=True, out_indices=(1, 2, 3, 4))
        ours = timm.create_model("resnet38_a1", pretrained=False, features_only=True, out_indices=(1, 2, 3, 4),
                                 width=0.125, cache_dir=".")
        for fm, red in ((ref, [4, 8, 16, 32]), (ours, [2, 4, 8, 16])):
            fi = fm.feature_info
            assert fi.reduction() == red and len(fi.channels()) == len(fi.module_name()) == 4
            assert fi.out_indices == (1, 2, 3, 4) and fi.get_dicts()[0].keys() >= {"num_chs", "reduction", "module"}
            outs = fm(x)
            assert [o.shape[1] for o in outs] == fi.channels() and [64 // o.shape[-1] for o in outs] == red
        assert ours.feature_info.module_name() == ["b2_2", "b3_2", "b4_5", "b5_2"]
        full = timm.create_model("resnet38_a1", features_only=True, width=0.125)
        assert full.feature_info.reduction() == [1, 2, 4, 8, 16, 32]
        assert full.feature_info.channels() == [8, 16, 32, 64, 128, 512]
        last2 = timm.create_model("resnet38_a1", features_only=True, out_indices=(-2, -1), width=0.125)
        assert last2.feature_info.reduction() == [16, 32] and [o.shape[1] for o in last2(x)] == [128, 512]
        d8 = timm.create_model("resnet38d", features_only=True, width=0.125)
        assert d8.feature_info.reduction() == [1, 2, 4, 8, 8, 8]
        m = timm.create_model("resnet38_a1", num_classes=10, drop_rate=0.5, global_pool="catavgmax", width=0.125)
        assert m.fc.in_features == 2 * 512 and m(x).shape == (2, 10) and m.drop_rate == 0.5
        m.reset_classifier(0, "")
        assert m(x).shape == (2, 512, 2, 2)
        cfg = timm.create_model("resnet38_a1", width=0.125).pretrained_cfg
        assert cfg["file"] == "ilsvrc-cls_rna-a1_cls1000_ep-0001.params" and not cfg.get("url")
        assert cfg["mean"] == (0.485, 0.456, 0.406) and cfg["input_size"] == (3, 320, 320) and cfg["crop_pct"] == 1.0
        assert {"resnet38_a1.ilsvrc", "resnet38d.ilsvrc"} <= set(timm.list_pretrained("resnet38*"))
        m = timm.create_model("resnet38_a1", pretrained_cfg="ilsvrc", pretrained_cfg_overlay=dict(crop_pct=0.9),
                              width=0.125)
        assert m.pretrained_cfg["crop_pct"] == 0.9
        try:
            timm.create_model("resnet38_a1", pretrained=True, width=0.125)
            raise AssertionError("no file: must fail")
        except FileNotFoundError as e:
            assert "pretrained_cfg_overlay=dict(file=PATH)" in str(e)
    """,
        tmp_path,
    )


def test_timm_forward_intermediates_and_prune(tmp_path):
    """timm's signature (same parameters and defaults as timm's resnet) and semantics; prune_intermediate_layers."""
    run_eco(
        """
        import inspect, timm
        sig = lambda f: [(p.name, p.default) for p in list(inspect.signature(f).parameters.values())[1:]]
        m = timm.create_model("resnet38_a1", width=0.125).eval()
        ours, timms = sig(m.forward_intermediates), sig(timm.create_model("resnet18").forward_intermediates)
        assert ours[:len(timms)] == timms and ours[len(timms):] == [("bn7", True)]  # + ours, keyword-only
        assert inspect.signature(m.forward_intermediates).parameters["bn7"].kind == inspect.Parameter.KEYWORD_ONLY
        x = torch.randn(1, 3, 64, 64)
        with torch.no_grad():
            final, inter = m.forward_intermediates(x)
            assert torch.equal(final, m.forward_features(x)) and len(inter) == 6
            last2 = m.forward_intermediates(x, indices=2, intermediates_only=True)
            assert [t.shape[-1] for t in last2] == [4, 2] and torch.equal(last2[1], final)
            early, picked = m.forward_intermediates(x, indices=[0, -3], stop_early=True)
            assert torch.equal(early, picked[-1]) and [t.shape[-1] for t in picked] == [64, 8]
            kept = m.prune_intermediate_layers([1, 3])
            assert kept == [1, 3] and m.fc is None and m.bn7 is None and not hasattr(m, "b5")
            assert torch.equal(m.forward_intermediates(x, [1, 3], intermediates_only=True)[1], inter[3])
    """,
        tmp_path,
    )


def test_timm_pretrained_cfg_overlay_loads_our_files(tmp_path):
    """pretrained=True with pretrained_cfg_overlay=dict(file=...) loads .params/.pth/.safetensors through our
    readers, into the plain model and into features_only; another num_classes drops the classifier."""
    run_eco(
        """
        import timm
        from widedeep.weights import save_weights
        src = timm.create_model("resnet38_a1", num_classes=10, width=0.125)
        for ext in (".params", ".pth", ".safetensors"):
            save_weights(src, "w" + ext)
            m = timm.create_model("resnet38_a1", pretrained=True, num_classes=10, width=0.125,
                                  pretrained_cfg_overlay=dict(file="w" + ext))
            assert all(torch.equal(a, b) for a, b in zip(src.state_dict().values(), m.state_dict().values())), ext
        f = timm.create_model("resnet38_a1", pretrained=True, features_only=True, width=0.125,
                              pretrained_cfg_overlay=dict(file="w.safetensors"))
        assert torch.equal(f.model.b4_5.conv_branch2b1.weight, src.b4_5.conv_branch2b1.weight)
        m = timm.create_model("resnet38_a1", pretrained=True, num_classes=3, width=0.125,
                              pretrained_cfg_overlay=dict(file="w.pth"))
        assert m.fc.out_features == 3 and torch.equal(m.conv1a.weight, src.conv1a.weight)
    """,
        tmp_path,
    )


def test_smp_unet_and_deeplabv3plus_forward_backward(tmp_path):
    """smp's tu- encoders: Unet (stride 32) and DeepLabV3Plus at encoder_output_stride 8 (dilated A1), forward and
    backward, gradients reaching the stem; full width for Unet, width 1/8 for DeepLabV3Plus (time)."""
    run_eco(
        """
        import segmentation_models_pytorch as smp
        x = torch.randn(2, 3, 64, 64)
        for net in (smp.Unet("tu-resnet38_a1", encoder_weights=None, classes=21),
                    smp.DeepLabV3Plus("tu-resnet38_a1", encoder_weights=None, classes=21, encoder_output_stride=8,
                                      width=0.125)):
            y = net.train()(x)
            assert y.shape == (2, 21, 64, 64)
            y.square().mean().backward()
            assert net.encoder.model.model.conv1a.weight.grad.abs().sum() > 0
        assert net.encoder.model.feature_info.reduction() == [1, 2, 4, 8, 8, 8]
    """,
        tmp_path,
        timeout=400,
    )


def test_fuse_torchvision_densenet_and_saved_bytes(tmp_path):
    """kernels.fuse_bn_relu_conv on torchvision's DenseNet-121: same outputs and keys, fewer saved bytes."""
    out = run_eco(
        """
        import copy, torchvision, kernels
        from kernels.profiling import saved_tensor_bytes
        model = torchvision.models.densenet121().train()
        fused = copy.deepcopy(model)
        kernels.fuse_bn_relu_conv(fused)
        x = torch.randn(2, 3, 64, 64)
        params = list(model.parameters()) + list(fused.parameters())
        plain, ours = (saved_tensor_bytes(lambda m=m: m(x), exclude=params) for m in (model, fused))
        torch.testing.assert_close(fused(x), model(x), rtol=1e-4, atol=1e-4)
        assert list(fused.state_dict()) == list(model.state_dict())
        print(ours / plain)
    """,
        tmp_path,
    )
    assert float(out.split()[-1]) < 0.7


# ---------------------------------------------------------------------------------- BNReLUConv2d as nn.Conv2d


@pytest.mark.parametrize(
    "args, kw",
    [
        ((6, 8, 3), dict(padding=1)),
        ((6, 8, 3, 2, 2, 2, 2, False), {}),  # positional: stride, padding, dilation, groups, bias (nn.Conv2d's order)
        ((6, 4, 1), dict(affine=False, track_running_stats=False)),
        ((6, 8, 3), dict(padding="same", padding_mode="reflect")),  # conv runs unfused
    ],
)
def test_bnreluconv2d_is_a_conv2d_drop_in(args, kw):
    """Same values and gradients as nn.Sequential(BatchNorm2d, ReLU, Conv2d) built with the same arguments."""
    torch.manual_seed(0)
    bn_kw = {k: kw[k] for k in ("affine", "track_running_stats") if k in kw}
    conv_kw = {k: v for k, v in kw.items() if k not in bn_kw}
    block = kernels.BNReLUConv2d(*args, **kw, backend="torch")
    ref = nn.Sequential(nn.BatchNorm2d(args[0], **bn_kw), nn.ReLU(), nn.Conv2d(*args, **conv_kw))
    assert [k.replace("bn.", "0.").replace("conv.", "2.") for k in block.state_dict()] == list(ref.state_dict())
    ref.load_state_dict({k.replace("bn.", "0.").replace("conv.", "2."): v for k, v in block.state_dict().items()})
    assert (block.conv.bias is None) == (ref[2].bias is None) and block.conv.groups == ref[2].groups
    x = torch.randn(2, args[0], 9, 9, requires_grad=True)
    xr = x.detach().clone().requires_grad_()
    y, yr = block(x), ref(xr)
    torch.testing.assert_close(y, yr)
    y.square().sum().backward()
    yr.square().sum().backward()
    torch.testing.assert_close(x.grad, xr.grad)
    for p, q in zip(block.parameters(), ref.parameters()):
        torch.testing.assert_close(p.grad, q.grad)
    if ref[0].track_running_stats:
        torch.testing.assert_close(block.bn.running_var, ref[0].running_var)


def test_bnreluconv2d_options_and_deprecated_conv_keyword():
    b = kernels.BNReLUConv2d(4, 4, 3, dtype=torch.float64, device="cpu", eps=1e-3, momentum=0.2)
    assert b.conv.weight.dtype == b.bn.weight.dtype == torch.float64 and b.conv.bias is not None
    assert (b.bn.eps, b.bn.momentum, b.conv_impl) == (1e-3, 0.2, "torch") and isinstance(b.conv, nn.Conv2d)
    with pytest.warns(DeprecationWarning, match="conv_impl"):
        old = kernels.BNReLUConv2d(4, 4, 3, conv="torch")
    assert old.conv_impl == "torch" and isinstance(old.conv, nn.Conv2d)


def test_import_widedeep_does_not_import_timm_or_torch():
    code = "import sys, widedeep; assert 'timm' not in sys.modules and 'torch' not in sys.modules, sys.modules.keys()"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO)
