"""Trainer flags for the model options (--activation, --activation-param, --weights-convention, --bn-eps,
--dilate-first-conv): parsed, validated in one line, and reaching create_model / read_weights (build_model on
a width-1/16 net, no training: the trainer's end-to-end runs are tests/test_train.py)."""

from __future__ import annotations

import pytest
import torch

from widedeep.models import create_model
from widedeep.train.cli import config, parse
from widedeep.train.distributed import DistInfo
from widedeep.train.engine import Context, TrainingError, build_model, model_options, resolve
from widedeep.weights import save_weights

LABEL = "cityscapes_rna-a2_cls19_s8"


def _ctx(argv):
    args = parse(argv)
    label, dataset, task = resolve(args)
    return Context(config(args, label=label, dataset=dataset, task=task), torch.device("cpu"), DistInfo())


def test_model_flags_reach_the_model_and_load_a_mapillary_style_file(tmp_path):
    opts = dict(activation="leaky_relu", activation_param=0.02, bn_eps=1e-5, dilate_first_conv=True)
    ref = create_model(LABEL, width=1 / 16, **opts).eval()
    for m in ref.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_var.uniform_(0.5, 2)
    path = tmp_path / "mine.safetensors"
    save_weights(ref, path)
    ctx = _ctx(
        [
            "--model",
            LABEL,
            "--width",
            "0.0625",
            "--phase",
            "val",
            "--weights",
            str(path),
            "--fused",
            "off",
            "--activation",
            "leaky_relu",
            "--activation-param",
            "0.02",
            "--bn-eps",
            "1e-5",
            "--dilate-first-conv",
            "--weights-convention",
            "plain",
        ]
    )
    model = build_model(ctx).eval()
    assert (model.activation, model.activation_param, model.bn_eps, model.dilate_first_conv) == (
        "leaky_relu",
        0.02,
        1e-5,
        True,
    )
    assert model.b5.conv_branch2a.dilation == (2, 2)  # dilated as Mapillary's WiderResNetA2(dilation=True)
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref(x), rtol=0, atol=0)
    # without the flags: the label's defaults (ReLU, eps 1.001e-5, ademxapp's undilated 5a)
    plain = build_model(_ctx(["--model", LABEL, "--width", "0.0625", "--fused", "off"]))
    assert (plain.activation, plain.bn_eps, plain.b5.conv_branch2a.dilation) == ("relu", 1.001e-5, (1, 1))
    # --weights-convention reaches read_weights: inplace_abn on one of our own files is refused there
    with pytest.raises(ValueError, match="inplace_abn"):
        build_model(
            _ctx(
                [
                    "--model",
                    LABEL,
                    "--width",
                    "0.0625",
                    "--phase",
                    "val",
                    "--weights",
                    str(path),
                    "--weights-convention",
                    "inplace_abn",
                ]
            )
        )


@pytest.mark.parametrize(
    "argv,msg",
    [
        (["--activation-param", "0.1"], "add --activation leaky_relu"),
        (["--activation", "leaky_relu", "--activation-param", "nan"], "finite slope"),
        (["--bn-eps", "0"], "positive"),
    ],
)
def test_model_flags_refuse_bad_values_in_one_line(argv, msg):
    with pytest.raises(TrainingError, match=msg) as e:
        model_options(parse(["--model", LABEL, *argv]))
    assert "\n" not in str(e.value)


def test_bad_activation_name_is_an_argparse_error(capsys):
    with pytest.raises(SystemExit):
        parse(["--model", LABEL, "--activation", "elu"])
    assert "--activation: invalid choice: 'elu'" in capsys.readouterr().err
