"""timm's model contract, as timm 1.0's own model tests check it, for every name we register with timm, run
against the real timm in the side venv (see tests/test_ecosystem.py; width-1/16 models at 32-64 px).

Checked per name: default-cfg attributes (num_classes, num_features, head_hidden_size, first_conv/classifier
keys) and the forward shapes after reset_classifier(0) / (0, ""); num_classes=42 gives (N, 42) logits and
gradients on every parameter; torch.jit.script under timm's set_scriptable(True), and scripting an fx-traced
model (timm's _create_fx_model recipe), both equal to eager. resnet38d / resnet38_a1_s8 in timm are stride-8
classifiers, while widedeep.models.create_model("resnet38d") keeps psa's forward (the relu(bn7) map).
"""

from __future__ import annotations

from test_ecosystem import run_eco


def test_timm_model_contract_for_every_registered_name(tmp_path):
    out = run_eco(
        """
        import timm
        from timm.layers import set_scriptable
        from timm.models._features_fx import get_notrace_functions, get_notrace_modules
        from torchvision.models.feature_extraction import create_feature_extractor, get_graph_node_names
        from widedeep.models import create_model as wd_create
        from widedeep.models.registry import ALIASES, PLAIN_NAMES

        names = sorted(timm.list_models("*resnet38*"))
        assert set(names) == set(PLAIN_NAMES) | set(ALIASES), names
        W = dict(width=0.0625)
        x = torch.randn(2, 3, 64, 64)
        for name in names:
            model = timm.create_model(name, pretrained=False, **W).eval()
            cfg, sd = model.pretrained_cfg, model.state_dict()
            assert model.num_classes >= 0 and model.num_features > 0 and model.head_hidden_size > 0, name
            assert cfg["first_conv"] + ".weight" in sd
            if cfg.get("num_classes"):
                assert cfg["classifier"] + ".weight" in sd, name
            stride = 8 if name in ("resnet38d", "resnet38_a1_s8") else 32
            f = model.forward_features(x)
            assert f.shape == (2, model.num_features, 64 // stride, 64 // stride), (name, f.shape)
            model.reset_classifier(0)
            assert model(x).shape == (2, model.head_hidden_size), name
            model.reset_classifier(0, "")
            assert model(x).shape == f.shape, name
            m0 = timm.create_model(name, num_classes=0, global_pool="", **W).eval()
            assert m0(x).shape == f.shape, name
            # timm's test_model_backward: (N, 42) logits, a gradient for every parameter
            m42 = timm.create_model(name, num_classes=42, **W).train()
            y = m42(torch.randn(2, 3, 32, 32))
            assert y.shape == (2, 42), (name, y.shape)
            y.mean().backward()
            missing = [n for n, p in m42.named_parameters() if p.grad is None]
            assert not missing, (name, missing)
            # torchscript: set_scriptable, and scripting an fx-traced model
            with set_scriptable(True):
                ms = timm.create_model(name, **W).eval()
            with torch.no_grad():
                ref = ms(x)
                torch.testing.assert_close(torch.jit.script(ms)(x), ref, rtol=1e-5, atol=1e-5)
                tk = dict(leaf_modules=get_notrace_modules(), autowrap_functions=get_notrace_functions(),
                          param_shapes_constant=True)
                tr, ev = get_graph_node_names(ms, tracer_kwargs=tk)
                fx = create_feature_extractor(ms, train_return_nodes=[tr[-1]], eval_return_nodes=[ev[-1]],
                                              tracer_kwargs=tk)
                torch.testing.assert_close(torch.jit.script(fx)(x)[ev[-1]], ref, rtol=1e-5, atol=1e-5)
            print("ok", name)
        # psa/SEAM's resnet38d stays a trunk whose forward is the stride-8 relu(bn7) map
        d = wd_create("resnet38d", **W).eval()
        assert d(x).shape == (2, d.num_features, 8, 8)
        assert set(d.forward_as_dict(x)) == {"conv3", "conv4", "conv5", "conv6"}
        t = timm.create_model("resnet38d", num_classes=42, **W).eval()
        assert t.forward_features(x).shape == (2, t.num_features, 8, 8) and t(x).shape == (2, 42)
        # a scripted model shares the model's parameters and keys (fused models script their plain forward)
        f = timm.create_model("resnet38_a1", fused=True, **W).eval()
        s = torch.jit.script(f)
        assert list(s.state_dict()) == list(f.state_dict())
        assert all(a.data_ptr() == b.data_ptr() for a, b in zip(s.state_dict().values(), f.state_dict().values()))
        print("done")
    """,
        tmp_path,
        timeout=600,
    )
    assert out.count("ok ") == 8 and out.strip().endswith("done"), out
