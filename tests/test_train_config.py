"""The trainer's shape (widedeep/train): one typed TrainConfig built from the flags, the task defaults in one table
that the help text is generated from, and no function too long to read at once. No training here (the trainer's
end-to-end and resume tests are tests/test_train.py, test_faults.py, test_trust.py)."""

from __future__ import annotations

import ast
import dataclasses
from pathlib import Path

import pytest

from widedeep.train import cli
from widedeep.train.cli import NO_MEANING_FLAGS, TASK_DEFAULTS, TrainConfig, config, parse, parser

ROOT = Path(__file__).resolve().parents[1]
TRAIN = ROOT / "widedeep" / "train"
MAX_FUNCTION_LINES = 60  # torchvision's train_one_epoch is ~45; a longer function wants splitting
SEG = dict(label="voc_rna-a1_cls21_s8", dataset="voc", task="seg")
CLS = dict(label="ilsvrc-cls_rna-a1_cls1000", dataset="ilsvrc", task="cls")


def test_every_flag_is_a_typed_config_field():
    """A flag added to the parser without its TrainConfig field (or a field no flag fills) fails here."""
    dests = {a.dest for a in parser()._actions if a.dest != "help"}
    dropped = {f.lstrip("-").replace("-", "_") for f in NO_MEANING_FLAGS}
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    resolved_only = {"label", "dataset", "task", "flags", "eval_batch", "demo"}
    assert dests - dropped == fields - resolved_only
    assert all(f.type not in ("object", "Any") for f in dataclasses.fields(TrainConfig))


@pytest.mark.parametrize("where", [SEG, CLS])
def test_task_defaults_fill_what_the_command_line_leaves_out(where):
    cfg = config(parse(["--model", where["label"]]), **where)
    d = TASK_DEFAULTS[where["task"]]
    got = {
        k: getattr(cfg, k)
        for k in ("batch_images", "eval_batch", "crop_size", "base_lr", "weight_decay", "test_scales", "bn_stats")
    }
    assert got == dataclasses.asdict(d)
    assert (cfg.split, cfg.stop_epoch, cfg.resume_path) == ("train", 1, None)
    assert cfg.flags["base_lr"] is None and cfg.flags["bn_stats"] == "auto"  # the checkpoint keeps what was typed


def test_given_flags_win_over_task_defaults():
    argv = [
        "--model",
        CLS["label"],
        "--batch-images",
        "7",
        "--crop-size",
        "100",
        "--base-lr",
        "0",
        "--weight-decay",
        "0",
        "--test-scales",
        "200,300",
        "--bn-stats",
        "frozen",
        "--phase",
        "val",
        "--to-epoch",
        "5",
        "--stop-epoch",
        "9",
        "--resume",
        "--output",
        "o",
    ]
    cfg = config(parse(argv), **CLS)
    assert (cfg.batch_images, cfg.eval_batch, cfg.crop_size, cfg.base_lr, cfg.weight_decay) == (7, 7, 100, 0.0, 0.0)
    assert (cfg.test_scales, cfg.bn_stats, cfg.split, cfg.stop_epoch) == ((200, 300), "frozen", "val", 5)
    assert cfg.resume_path == Path("o") / CLS["label"] / "last.pt"
    # seg evaluates one image at a time whatever --batch-images says; cls trains with it in --phase train only
    seg = config(parse(["--model", SEG["label"], "--batch-images", "4", "--phase", "val"]), **SEG)
    assert (seg.batch_images, seg.eval_batch) == (4, 1)
    cls_train = config(parse(["--model", CLS["label"], "--batch-images", "4"]), **CLS)
    assert cls_train.eval_batch == TASK_DEFAULTS["cls"].eval_batch


def test_help_text_is_generated_from_the_task_table(monkeypatch):
    text = " ".join(parser().format_help().split())
    assert "(default: cls 0.1, seg 0.0016)" in text and "cls 0.0001, seg 0.0005" in text
    assert "cls 256, seg 16" in text and "cls 224, seg 504" in text and "auto = cls batch, seg frozen" in text
    changed = dict(TASK_DEFAULTS, seg=dataclasses.replace(TASK_DEFAULTS["seg"], base_lr=0.0042))
    monkeypatch.setattr(cli, "TASK_DEFAULTS", changed)
    assert "(default: cls 0.1, seg 0.0042)" in " ".join(parser().format_help().split())
    assert config(parse(["--model", SEG["label"]]), **SEG).base_lr == 0.0042


def test_make_optimizer_takes_its_default_weight_decay_from_the_table(monkeypatch):
    import torch

    from widedeep.train import optim

    monkeypatch.setattr(optim, "TASK_DEFAULTS", {"seg": dataclasses.replace(TASK_DEFAULTS["seg"], weight_decay=0.25)})
    opt = optim.make_optimizer(torch.nn.Conv2d(1, 1, 1), "seg", 0.1)
    assert [g["weight_decay"] for g in opt.param_groups] == [0.25, 0.0]


def _numbers(path: Path) -> list[float]:
    return [
        n.value
        for n in ast.walk(ast.parse(path.read_text()))
        if isinstance(n, ast.Constant) and isinstance(n.value, float)
    ]


def test_the_learning_rate_and_decay_defaults_have_one_copy():
    """The task table is the only place in widedeep/train that writes the lr and weight-decay defaults (the
    numbers, and no help text spelling them out by hand)."""
    values = {v for d in TASK_DEFAULTS.values() for v in (d.base_lr, d.weight_decay)} - {0.1}  # 0.1 is common
    for path in sorted(TRAIN.glob("*.py")):
        if path.name == "cli.py":
            continue
        assert not values & set(_numbers(path)), (path.name, values & set(_numbers(path)))
        assert "seg 0.0016" not in path.read_text() and "seg 5e-4" not in path.read_text(), path.name
    assert sorted(_numbers(TRAIN / "cli.py")).count(TASK_DEFAULTS["seg"].base_lr) == 1


def test_no_function_in_the_trainer_is_over_60_lines():
    long = []
    for path in sorted(TRAIN.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_FUNCTION_LINES:
                    long.append(f"{path.name}:{node.lineno} {node.name} ({lines} lines)")
    assert not long, long


def test_the_trainer_reads_the_config_not_the_namespace():
    """engine.py reads ctx.cfg (typed); an ``args`` namespace appears only where the flags are parsed and placed."""
    for name in ("engine.py", "graphs.py", "losses.py", "optim.py"):
        tree = ast.parse((TRAIN / name).read_text())
        reads = [
            n.lineno
            for n in ast.walk(tree)
            if isinstance(n, ast.Attribute)
            and n.attr == "args"
            and isinstance(n.value, ast.Name)
            and n.value.id == "ctx"
        ]
        assert not reads, (name, reads)
