"""ResNet-38 built on the recompute kernels: same keys, outputs and gradients; half the saved activations."""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import kernels
from kernels.profiling import saved_tensor_bytes
from widedeep.models import create_model


@pytest.mark.parametrize("name", ["ilsvrc-cls_rna-a_cls1000", "ilsvrc-cls_rna-a1_cls1000", "voc_rna-a2_cls21_s8"])
def test_fused_equals_unfused_in_float64(name):
    """fp64 makes the comparison exact (1e-9): differences would be logic, not rounding."""
    plain = create_model(name).double().train()
    fused = create_model(name, fused="torch").double().train()
    assert list(fused.state_dict()) == list(plain.state_dict())
    fused.load_state_dict(plain.state_dict())
    for m in (plain, fused):  # dropout off so both see the same function
        for u in m.units():
            u.spec = type(u.spec)(**{**u.spec.__dict__, "dropout": 0.0})
    x = (
        torch.randn(2, 3, 79, 37, dtype=torch.float64)
        if "rna-a_" in name
        else torch.randn(2, 3, 33, 29, dtype=torch.float64)
    )
    y, yf = plain(x), fused(x)
    torch.testing.assert_close(yf, y, rtol=1e-9, atol=1e-9)
    y.square().sum().backward()
    yf.square().sum().backward()
    for (k, p), q in zip(plain.named_parameters(), fused.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-7, atol=1e-9 * p.grad.abs().max().item(), msg=k)
    for (k, b), c in zip(plain.named_buffers(), fused.buffers()):
        torch.testing.assert_close(c, b, rtol=1e-9, atol=1e-12, msg=k)


def test_fused_triton_backend_matches_in_fp32():
    """The triton backend's A1-s8 (width 1/16: the same kernels and code path as full width) against plain torch in
    fp32: output, every parameter gradient (each to 1e-4 of its own largest magnitude: measured <= 1.5e-5) and
    the running statistics. Stride 8 at 48 px keeps 36 values per channel in every BN: small batches at stride 32
    make train-mode BN so ill-conditioned that fp32 rounding alone moves outputs by 10%."""
    plain = create_model("voc_rna-a1_cls21_s8", dropout=None, width=0.0625).train()
    fused = create_model("voc_rna-a1_cls21_s8", dropout=None, fused="triton", width=0.0625).train()
    fused.load_state_dict(plain.state_dict())
    x = torch.randn(1, 3, 48, 48)
    y, yf = plain(x), fused(x)
    torch.testing.assert_close(yf, y, rtol=1e-4, atol=1e-4 * y.abs().max().item())
    y.logsumexp(1).sum().backward()
    yf.logsumexp(1).sum().backward()
    for (k, p), q in zip(plain.named_parameters(), fused.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-4, atol=1e-4 * p.grad.abs().max().item(), msg=k)
    for (k, b), c in zip(plain.named_buffers(), fused.buffers()):
        torch.testing.assert_close(c, b, rtol=1e-5, atol=1e-5, msg=k)


@pytest.mark.parametrize("name", ["ilsvrc-cls_rna-a1_cls1000", "voc_rna-a1_cls21_s8"])
def test_saved_activation_bytes_at_most_055_of_unfused(name):
    model = create_model(name).train()
    x = torch.randn(2, 3, 64, 64)
    unfused = saved_tensor_bytes(lambda: model(x).sum(), exclude=model.parameters())
    model.set_fused(True)
    fused = saved_tensor_bytes(lambda: model(x).sum(), exclude=model.parameters())
    assert fused <= 0.55 * unfused, (fused, unfused)


def test_fuse_pass_keeps_keys_and_matches():
    def net():
        return nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1),
            nn.Sequential(
                nn.BatchNorm2d(8),
                nn.ReLU(inplace=True),
                nn.Conv2d(8, 8, 3, padding=2, dilation=2),
                nn.BatchNorm2d(8),
                nn.ReLU(),
                nn.Conv2d(8, 4, 1),
            ),
            nn.BatchNorm2d(4),
            nn.ReLU(),
            nn.Flatten(),
        )

    plain, fused = net().train(), net().train()
    fused.load_state_dict(plain.state_dict())
    keys = list(fused.state_dict())
    params = [id(p) for p in fused.parameters()]
    assert kernels.fuse_bn_relu_conv(fused, backend="torch") == 2  # the trailing BN-ReLU has no conv: left alone
    assert list(fused.state_dict()) == keys and [id(p) for p in fused.parameters()] == params
    x = torch.randn(2, 3, 9, 9)
    y, yf = plain(x), fused(x)
    torch.testing.assert_close(yf, y, rtol=1e-5, atol=1e-5)
    y.square().sum().backward()
    yf.square().sum().backward()
    scale = max(p.grad.abs().max().item() for p in plain.parameters())  # conv bias before a BN: grad is ~0
    for p, q in zip(plain.parameters(), fused.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-4, atol=1e-5 * scale)
    saved_plain = saved_tensor_bytes(lambda: plain(x), exclude=plain.parameters())
    saved_fused = saved_tensor_bytes(lambda: fused(x), exclude=fused.parameters())
    assert saved_fused < saved_plain


class _PsaLikeUnit(nn.Module):
    """A pre-activation unit written like psa's ResBlock: functional ReLU, one activation feeding two convs."""

    def __init__(self):
        super().__init__()
        self.bn_branch2a = nn.BatchNorm2d(6)
        self.conv_branch2a = nn.Conv2d(6, 8, 3, padding=1, bias=False)
        self.conv_branch1 = nn.Conv2d(6, 8, 1, bias=False)
        self.bn_branch2b1 = nn.BatchNorm2d(8)
        self.relu = nn.ReLU()
        self.conv_branch2b1 = nn.Conv2d(8, 8, 3, padding=2, dilation=2, bias=False)
        self.bn_side = nn.BatchNorm2d(8)

    def forward(self, x):
        a = F.relu(self.bn_branch2a(x))
        t = self.conv_branch2b1(self.relu(self.bn_branch2b1(self.conv_branch2a(a))))
        side = F.relu(self.bn_side(t))  # also used by the sum below: must stay unfused
        return self.conv_branch1(a) + t + side


def test_fuse_pass_traces_custom_forwards():
    def net():
        return nn.Sequential(
            nn.Conv2d(3, 6, 3, padding=1),
            _PsaLikeUnit(),
            nn.Sequential(nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 2, 1)),
        )

    plain, fused = net().train(), net().train()
    fused.load_state_dict(plain.state_dict())
    keys = list(fused.state_dict())
    assert kernels.fuse_bn_relu_conv(fused, backend="torch") == 3
    assert list(fused.state_dict()) == keys
    x = torch.randn(2, 3, 9, 9)
    y, yf = plain(x), fused(x)
    torch.testing.assert_close(yf, y, rtol=1e-5, atol=1e-5)
    y.square().sum().backward()
    yf.square().sum().backward()
    scale = max(p.grad.abs().max().item() for p in plain.parameters())
    for p, q in zip(plain.parameters(), fused.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-4, atol=1e-5 * scale)
    assert saved_tensor_bytes(lambda: fused(x), fused.parameters()) < saved_tensor_bytes(
        lambda: plain(x), plain.parameters()
    )
    fused.eval()
    assert not fused[1].bn_branch2a.training  # mode switches still reach the shared modules


class _DropoutInForward(nn.Module):
    """A custom forward reading ``self.training`` (fx would freeze it at trace time)."""

    def __init__(self):
        super().__init__()
        self.bn1, self.conv1 = nn.BatchNorm2d(4), nn.Conv2d(4, 6, 3, padding=1)
        self.bn2, self.conv2 = nn.BatchNorm2d(6), nn.Conv2d(6, 3, 1)

    def forward(self, x):
        y = self.conv1(F.relu(self.bn1(x)))
        y = F.dropout(y, 0.5, training=self.training)
        return self.conv2(F.relu(self.bn2(y)))


@pytest.mark.parametrize("fuse_in", ["train", "eval"])
def test_fuse_pass_keeps_train_and_eval_behaviour(fuse_in):
    plain, fused = _DropoutInForward(), _DropoutInForward()
    fused.load_state_dict(plain.state_dict())
    x = torch.randn(2, 4, 8, 8)
    getattr(fused, fuse_in)()
    assert kernels.fuse_bn_relu_conv(fused, backend="torch") == 2
    plain.eval(), fused.eval()
    a, b = fused(x), fused(x)
    assert torch.equal(a, b)  # eval after fusing is deterministic: no dropout frozen in from training
    torch.testing.assert_close(a, plain(x), rtol=1e-5, atol=1e-6)
    plain.train(), fused.train()
    torch.manual_seed(1)
    y = plain(x)
    torch.manual_seed(1)
    yf = fused(x)
    torch.testing.assert_close(yf, y, rtol=1e-5, atol=1e-6)  # and training still drops (same mask: same RNG)
    assert not torch.equal(yf, fused(x))
    for m in (fused.bn1, fused.bn2):
        assert m.running_mean.abs().sum() > 0  # batch statistics still update in training
