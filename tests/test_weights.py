"""MXNet .params reader/writer, name mapping, loading errors, round trips, and MXNet itself as an oracle."""

import os
import struct
import subprocess
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from widedeep.models import create_model
from widedeep.weights import (
    ChecksumError,
    ParamsFormatError,
    WeightsMismatchError,
    load_weights,
    read_params,
    read_state_dict,
    save_weights,
    to_ademxapp,
    write_params,
)
from widedeep.weights.mxnet_params import V1_MAGIC, V2_MAGIC, V3_MAGIC

ALL_DTYPES = [
    torch.float32,
    torch.float64,
    torch.float16,
    torch.uint8,
    torch.int32,
    torch.int8,
    torch.int64,
    torch.bool,
    torch.int16,
    torch.bfloat16,
]


def _arrays():
    g = torch.Generator().manual_seed(0)
    out = {}
    for i, dt in enumerate(ALL_DTYPES):
        t = torch.randn(3, 2, i + 1, generator=g) * 50
        out[f"arg:x{i}_{str(dt).split('.')[-1]}"] = t.to(dt)
    out["aux:scalar_like"] = torch.tensor([3.5])
    return out


@pytest.mark.parametrize("fmt", ["v2", "legacy"])
def test_write_read_round_trip_is_bit_exact_for_every_dtype(tmp_path, fmt):
    arrays = _arrays()
    path = tmp_path / "a.params"
    write_params(path, arrays, fmt=fmt)
    back = read_params(path)
    assert list(back) == list(arrays)
    for k in arrays:
        assert back[k].dtype == arrays[k].dtype and back[k].shape == arrays[k].shape
        assert torch.equal(back[k].view(torch.uint8) if back[k].dtype == torch.bool else back[k], arrays[k])


def _header(n):
    return struct.pack("<QQQ", 0x112, 0, n)


def _names(names):
    return struct.pack("<Q", len(names)) + b"".join(struct.pack("<Q", len(n)) + n.encode() for n in names)


def test_reads_v1_and_v3_records(tmp_path):
    data = np.arange(6, dtype="<f4").reshape(2, 3)
    v1 = struct.pack("<Ii2q", V1_MAGIC, 2, 2, 3) + struct.pack("<iii", 1, 0, 0) + data.tobytes()
    v3 = struct.pack("<Iii2q", V3_MAGIC, 0, 2, 2, 3) + struct.pack("<iii", 2, 0, 0) + data.tobytes()
    path = tmp_path / "v.params"
    path.write_bytes(_header(2) + v1 + v3 + _names(["arg:a", "aux:b"]))
    out = read_params(path)
    assert torch.equal(out["arg:a"], torch.from_numpy(data)) and torch.equal(out["aux:b"], torch.from_numpy(data))


def test_sparse_record_gets_a_clear_error(tmp_path):
    rec = struct.pack("<Iii1q", V2_MAGIC, 1, 1, 4)  # row_sparse
    path = tmp_path / "sparse.params"
    path.write_bytes(_header(1) + rec + b"\0" * 64)
    with pytest.raises(ParamsFormatError, match=r"sparse.params.*sparse array \(row_sparse\)"):
        read_params(path)


def test_bad_magic_truncation_and_trailing_bytes(tmp_path):
    good = tmp_path / "good.params"
    write_params(good, {"arg:w": torch.randn(4, 5)})
    raw = good.read_bytes()
    bad = tmp_path / "bad.params"
    bad.write_bytes(b"\x13" + raw[1:])
    with pytest.raises(ParamsFormatError, match=r"bad.params: bad magic"):
        read_params(bad)
    for cut in (10, 30, 60, len(raw) - 3):
        short = tmp_path / f"short{cut}.params"
        short.write_bytes(raw[:cut])
        with pytest.raises(ParamsFormatError, match=rf"short{cut}.params: truncated"):
            read_params(short)
    long = tmp_path / "long.params"
    long.write_bytes(raw + b"xx")
    with pytest.raises(ParamsFormatError, match="trailing"):
        read_params(long)
    with pytest.raises(FileNotFoundError, match="nope.params"):
        read_params(tmp_path / "nope.params")


def test_npz_from_mxnet2_is_read(tmp_path):
    path = tmp_path / "m.npz"
    np.savez(path, **{"arg:conv1a_weight": np.ones((64, 3, 3, 3), "f4")})
    assert read_params(path)["arg:conv1a_weight"].shape == (64, 3, 3, 3)


@pytest.fixture(scope="module")
def a1_cls():
    return create_model("ilsvrc-cls_rna-a1_cls1000").eval()


@pytest.fixture(scope="module")
def a1_seg():
    torch.manual_seed(1)
    return create_model("voc_rna-a1_cls21_s8").eval()


def test_ademxapp_names_and_counts(a1_cls, a1_seg):
    cls = to_ademxapp(a1_cls.state_dict())
    seg = to_ademxapp(a1_seg.state_dict())
    assert len(cls) == 193 and sum(k.startswith("arg:") for k in cls) == 119
    assert len(seg) == 195 and sum(k.startswith("arg:") for k in seg) == 121
    assert cls["arg:conv1a_weight"].shape == (64, 3, 3, 3)
    assert cls["arg:linear1000_weight"].shape == (1000, 4096)
    assert cls["arg:res2a_branch2a_weight"].shape == (128, 64, 3, 3)
    assert cls["arg:bn2a_branch2a_gamma"].shape == (64,)
    assert cls["arg:res5a_branch2b1_weight"].shape == (1024, 512, 3, 3)
    assert cls["arg:res6a_branch2b2_weight"].shape == (2048, 1024, 1, 1)
    assert cls["arg:res7a_branch2b1_weight"].shape == (2048, 1024, 3, 3)
    assert cls["aux:bn7a_branch2b2_moving_var"].shape == (2048,)
    assert cls["aux:bn4b3_branch2a_moving_mean"].shape == (512,)
    assert seg["arg:conv6a_weight"].shape == (512, 4096, 3, 3) and seg["arg:linear21_bias"].shape == (21,)


@pytest.mark.parametrize("suffix", [".params", ".safetensors", ".pth"])
def test_model_round_trips_give_identical_outputs(tmp_path, a1_seg, suffix):
    path = tmp_path / f"voc_rna-a1_cls21_s8_ep-0007{suffix}"
    save_weights(a1_seg, path)
    back = create_model("voc_rna-a1_cls21_s8", weights=str(path)).eval()
    x = torch.randn(1, 3, 41, 35)
    with torch.no_grad():
        assert torch.equal(back(x), a1_seg(x))


def test_legacy_params_load_into_the_model(tmp_path, a1_cls):
    path = tmp_path / "ilsvrc-cls_rna-a1_cls1000_ep-0003.params"
    save_weights(a1_cls, path, params_format="legacy")
    m = create_model("ilsvrc-cls_rna-a1_cls1000", weights=str(path))
    assert all(torch.equal(a, b) for a, b in zip(m.state_dict().values(), a1_cls.state_dict().values()))


def test_load_errors_list_what_is_wrong(tmp_path, a1_cls):
    arrays = to_ademxapp(a1_cls.state_dict())
    missing = dict(arrays)
    del missing["arg:res4b3_branch2a_weight"], missing["aux:bn7_moving_var"]
    write_params(tmp_path / "missing.params", missing)
    with pytest.raises(
        WeightsMismatchError, match=r"missing.params.*missing from the file \(2\): .*b4_3.conv_branch2a.weight"
    ):
        load_weights(create_model("resnet38_a1"), tmp_path / "missing.params")
    extra = dict(arrays, **{"arg:res9a_branch2a_weight": torch.zeros(1)})
    write_params(tmp_path / "extra.params", extra)
    with pytest.raises(WeightsMismatchError, match=r"extra.params.*b9.conv_branch2a.weight"):
        load_weights(create_model("resnet38_a1"), tmp_path / "extra.params")
    bad_shape = dict(arrays, **{"arg:res2a_branch2a_weight": torch.zeros(128, 64, 1, 1)})
    write_params(tmp_path / "shape.params", bad_shape)
    with pytest.raises(
        WeightsMismatchError, match=r"b2.conv_branch2a.weight file \(128, 64, 1, 1\) vs model \(128, 64, 3, 3\)"
    ):
        load_weights(create_model("resnet38_a1"), tmp_path / "shape.params")
    write_params(tmp_path / "junk.params", dict(arrays, **{"arg:fc8_weight": torch.zeros(2)}))
    with pytest.raises(WeightsMismatchError, match=r"not ResNet-38 .*fc8_weight"):
        load_weights(create_model("resnet38_a1"), tmp_path / "junk.params")


def test_class_count_mismatch_and_num_classes_override(tmp_path, a1_cls):
    path = tmp_path / "ilsvrc-cls_rna-a1_cls1000_ep-0002.params"
    save_weights(a1_cls, path)
    with pytest.raises(WeightsMismatchError, match="1000 classes but the model has 10: .*num_classes=1000"):
        load_weights(create_model("resnet38_a1", num_classes=10), path)
    m = create_model("ilsvrc-cls_rna-a1_cls1000", num_classes=10, weights=str(path))
    assert m.fc.out_features == 10 and torch.equal(m.conv1a.weight, a1_cls.conv1a.weight)
    # classification weights initialise a segmentation net's trunk (the seed's fine-tuning start)
    seg = create_model("voc_rna-a1_cls21_s8", weights=str(path), weights_strict=False)
    assert torch.equal(seg.b7.conv_branch2b2.weight, a1_cls.b7.conv_branch2b2.weight)


def test_released_names_are_md5_checked(tmp_path, a1_cls, caplog):
    # A released name with another md5 is the user's own export (the trainer names them so): warn and load.
    path = tmp_path / "ilsvrc-cls_rna-a1_cls1000_ep-0001.params"
    save_weights(a1_cls, path)
    with caplog.at_level("WARNING", logger="widedeep.weights"):
        assert "conv1a.weight" in read_state_dict(path)
    assert "does not match the released" in caplog.text and "loading it as your own file" in caplog.text
    with pytest.raises(ChecksumError, match="does not match the released .*--no-verify-weights"):
        read_state_dict(path, verify="strict")
    assert "conv1a.weight" in read_state_dict(path, verify=False)


def test_psa_pth_with_dataparallel_prefix_loads(tmp_path):
    src = create_model("resnet38d")
    psa = {f"module.{k}": v for k, v in src.state_dict().items() if not k.endswith("num_batches_tracked")}
    torch.save(psa, tmp_path / "resnet38d.pth")
    m = create_model("resnet38d", weights=str(tmp_path / "resnet38d.pth"))
    assert torch.equal(m.b4_5.bn_branch2b1.running_var, src.b4_5.bn_branch2b1.running_var)


# ---------------------------------------------------------------- MXNet 1.9.1 as an oracle (optional)
def _mxnet_python() -> str | None:
    for cand in (os.environ.get("WIDEDEEP_MXNET_PYTHON"), "/opt/mxnet-venv/bin/python"):
        if cand and Path(cand).exists():
            ok = subprocess.run([cand, "-c", "import mxnet"], capture_output=True).returncode == 0
            if ok:
                return cand
    return None


MXNET = _mxnet_python()
needs_mxnet = pytest.mark.skipif(MXNET is None, reason="MXNet 1.9.1 venv not found (set WIDEDEEP_MXNET_PYTHON)")


@needs_mxnet
def test_file_written_by_mxnet_reads_bit_exactly(tmp_path):
    script = textwrap.dedent(f"""
        import mxnet as mx, numpy as np
        rng = np.random.RandomState(0)
        d = {{"arg:conv1a_weight": mx.nd.array(rng.randn(64, 3, 3, 3).astype("f4")),
              "aux:bn7_moving_var": mx.nd.array(rng.rand(4096).astype("f4")),
              "arg:h": mx.nd.array(rng.randn(5, 7), dtype="float16"),
              "arg:i": mx.nd.array(rng.randint(0, 100, (3, 4)), dtype="int32"),
              "arg:d": mx.nd.array(rng.randn(2, 2), dtype="float64")}}
        mx.nd.save(r"{tmp_path}/mx.params", d)
        np.savez(r"{tmp_path}/ref.npz", **{{k: v.asnumpy() for k, v in d.items()}})
    """)
    subprocess.run([MXNET, "-c", script], check=True, capture_output=True)
    ours = read_params(tmp_path / "mx.params")
    ref = np.load(tmp_path / "ref.npz")
    for k in ref.files:
        assert ours[k].numpy().dtype == ref[k].dtype and np.array_equal(ours[k].numpy(), ref[k]), k


@needs_mxnet
@pytest.mark.parametrize("fmt", ["v2", "legacy"])
def test_files_we_write_load_in_mxnet(tmp_path, fmt):
    arrays = {
        "arg:conv1a_weight": torch.randn(64, 3, 3, 3),
        "aux:bn7_moving_mean": torch.randn(4096),
        "arg:h": torch.randn(3, 5).half(),
        "arg:q": torch.arange(12, dtype=torch.int64).view(3, 4),
    }
    write_params(tmp_path / "ours.params", arrays, fmt=fmt)
    np.savez(tmp_path / "ref.npz", **{k: v.numpy() for k, v in arrays.items()})
    script = textwrap.dedent(f"""
        import mxnet as mx, numpy as np
        d = mx.nd.load(r"{tmp_path}/ours.params"); ref = np.load(r"{tmp_path}/ref.npz")
        assert sorted(d) == sorted(ref.files), (sorted(d), ref.files)
        for k in ref.files:
            a = d[k].asnumpy()
            assert a.dtype == ref[k].dtype and np.array_equal(a, ref[k]), k
        print("OK")
    """)
    out = subprocess.run([MXNET, "-c", script], capture_output=True, text=True)
    assert out.returncode == 0 and "OK" in out.stdout, out.stderr[-2000:]
