"""Swap BatchNorm2d -> ReLU -> Conv2d chains of existing models for the recompute-in-backward kernel.

Caught, anywhere in the model:

1. three consecutive children ``BatchNorm2d``/``SyncBatchNorm``, ``ReLU``, ``Conv2d`` of an ``nn.Sequential``
   (exact type): the container's class becomes :class:`FusedSequential`;
2. with ``trace=True`` (default), chains in custom ``forward`` code, found by torch.fx on the real data flow:
   a BN whose only user is a ReLU (``nn.ReLU``, ``F.relu``, ``torch.relu``, ``.relu()``) whose users are all
   ``Conv2d`` modules, e.g. psa's ``F.relu(self.bn_branch2a(x))`` feeding ``conv_branch2a`` *and*
   ``conv_branch1`` (they share one recomputed activation). The rewritten graph becomes that module's
   ``forward`` (an instance attribute); its other methods are unchanged. Modules that fx cannot trace are
   skipped (their children are tried). Python-level reads of ``self.training`` are traced per mode (one
   graph for train, one for eval, picked by the module's mode at call time); other Python attributes are
   frozen at fuse time, as in any torch.fx transform.

The modules themselves are untouched and stay where they are, so parameters, buffers, state_dict keys and
optimizer state are exactly those of the original model. Not caught: chains whose BN or ReLU output is also
used elsewhere (the activation must then exist anyway).
"""

from __future__ import annotations

import operator

import torch
import torch.fx
import torch.nn as nn
import torch.nn.functional as F

from .api import bn_relu_conv


def _is_chain(mods: list[nn.Module], i: int) -> bool:
    if i + 2 >= len(mods):
        return False
    bn, relu, conv = mods[i : i + 3]
    return (
        isinstance(bn, (nn.BatchNorm2d, nn.SyncBatchNorm))
        and type(relu) is nn.ReLU
        and type(conv) is nn.Conv2d
        and conv.padding_mode == "zeros"
        and not isinstance(conv.padding, str)
    )


class FusedSequential(nn.Sequential):
    """nn.Sequential whose BN-ReLU-Conv chains (at ``fused_starts``) run as one recompute kernel."""

    fused_starts: tuple[int, ...] = ()
    fused_backend: str = "auto"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mods = list(self)
        i = 0
        while i < len(mods):
            if i in self.fused_starts:
                bn, conv = mods[i], mods[i + 2]
                x = bn_relu_conv(
                    x,
                    bn,
                    [conv],
                    backend=self.fused_backend,
                    sync=isinstance(bn, nn.SyncBatchNorm),
                    process_group=getattr(bn, "process_group", None),
                )[0]
                i += 3
            else:
                x = mods[i](x)
                i += 1
        return x


class _FusedChain(nn.Module):
    """Graph node running one BN -> ReLU -> conv(s) chain; holds its modules unregistered (no state_dict keys)."""

    def __init__(self, bn: nn.Module, convs: list[nn.Conv2d], backend: str):
        super().__init__()
        object.__setattr__(self, "_chain", (bn, convs))
        self.backend = backend

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        bn, convs = self._chain
        return tuple(
            bn_relu_conv(
                x,
                bn,
                convs,
                backend=self.backend,
                sync=isinstance(bn, nn.SyncBatchNorm),
                process_group=getattr(bn, "process_group", None),
            )
        )


def _is_relu(node: torch.fx.Node, modules: dict) -> bool:
    if node.op == "call_module":
        return type(modules.get(node.target)) is nn.ReLU
    if node.op == "call_function":
        return node.target in (F.relu, torch.relu, torch.relu_)
    return node.op == "call_method" and node.target in ("relu", "relu_")


class _Tracer(torch.fx.Tracer):
    """Keeps already-fused containers opaque: they are not traced into again."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, (FusedSequential, _FusedChain)) or super().is_leaf_module(m, qualname)


def _trace(module: nn.Module, training: bool) -> torch.fx.GraphModule:
    """``module`` traced as in ``module.train(training)``; every module's own mode is restored afterwards."""
    modes = {m: m.training for m in module.modules()}
    try:
        for m in modes:
            m.training = training  # set directly: a train() override (frozen BN) must not change the trace
        return torch.fx.GraphModule(module, _Tracer().trace(module))
    finally:
        for m, mode in modes.items():
            m.training = mode


class _PerMode:
    """``forward`` of a module whose traced graph depends on its mode (e.g. ``F.dropout(..., self.training)``):
    fx freezes Python-level attributes at trace time, so there is one graph per mode, picked at call time."""

    def __init__(self, owner: nn.Module, train_graph: torch.fx.GraphModule, eval_graph: torch.fx.GraphModule):
        self.owner, self.train_graph, self.eval_graph = owner, train_graph, eval_graph

    def __call__(self, *args, **kwargs):
        return (self.train_graph if self.owner.training else self.eval_graph)(*args, **kwargs)


def _rewrite(gm: torch.fx.GraphModule, module: nn.Module, backend: str, chains: dict) -> None:
    """Replace the BN -> ReLU -> Conv2d chains of ``gm``'s graph by :class:`_FusedChain` nodes.

    ``chains`` maps (bn, convs) targets to the chain module's name, shared by the graphs of both modes.
    """
    modules = dict(gm.named_modules())
    graph = gm.graph
    for node in list(graph.nodes):
        if node.op != "call_module" or not isinstance(modules.get(node.target), (nn.BatchNorm2d, nn.SyncBatchNorm)):
            continue
        if len(node.users) != 1 or len(node.args) != 1:
            continue
        relu = next(iter(node.users))
        if not _is_relu(relu, modules) or relu.args[0] is not node or not relu.users:
            continue
        convs = list(relu.users)
        if not all(
            c.op == "call_module"
            and type(modules.get(c.target)) is nn.Conv2d
            and len(c.args) == 1
            and not c.kwargs
            and modules[c.target].padding_mode == "zeros"
            and not isinstance(modules[c.target].padding, str)
            for c in convs
        ):
            continue
        key = (node.target, tuple(c.target for c in convs))
        if key not in chains:
            chains[key] = name = f"_fused_chain_{chains['start'] + len(chains) - 1}"
            module.add_module(name, _FusedChain(modules[node.target], [modules[c.target] for c in convs], backend))
        name = chains[key]
        gm.add_submodule(name, module.get_submodule(name))
        with graph.inserting_before(node):
            fused = graph.call_module(name, (node.args[0],))
        for i, c in enumerate(convs):
            with graph.inserting_after(fused):
                item = graph.call_function(operator.getitem, (fused, i))
            c.replace_all_uses_with(item)
        for dead in convs + [relu, node]:
            graph.erase_node(dead)
    graph.lint()
    gm.recompile()


def _fuse_traced(module: nn.Module, backend: str, start: int) -> int:
    """Trace ``module`` and rewrite its BN -> ReLU -> Conv2d chains; 0 when untraceable or nothing found.

    Traced in both modes; when the two graphs differ (Python code reading ``self.training``), the module's
    forward picks the graph of its current mode, so ``m.eval()`` after fusing behaves like the original.
    """
    try:
        graphs = {mode: _trace(module, mode) for mode in (True, False)}
    except Exception:  # data-dependent control flow etc.: the caller tries the children instead
        return 0
    chains: dict = {"start": start}
    for gm in graphs.values():
        _rewrite(gm, module, backend, chains)
    found = len(chains) - 1
    if found:
        train_graph, eval_graph = graphs[True], graphs[False]
        if train_graph.code == eval_graph.code:
            module.forward = train_graph.forward  # the graph shares every submodule with `module`
        else:
            module.forward = _PerMode(module, train_graph, eval_graph)
    return found


def fuse_bn_relu_conv(model: nn.Module, *, backend: str = "auto", trace: bool = True) -> int:
    """Fuse every BN -> ReLU -> Conv2d chain of ``model`` in place (see the module docstring for the patterns).

    Returns the number of chains fused. ``backend``: ``"auto"``, ``"triton"`` or ``"torch"``.
    """
    fused = 0
    for module in list(model.modules()):
        if type(module) not in (nn.Sequential, FusedSequential):
            continue
        mods = list(module)
        starts, i = [], 0
        while i < len(mods):
            if _is_chain(mods, i):
                starts.append(i)
                i += 3
            else:
                i += 1
        if starts:
            module.__class__ = FusedSequential
            module.fused_starts = tuple(starts)
            module.fused_backend = backend
            fused += len(starts)
    if trace:
        fused += _fuse_traced_tree(model, backend, fused)
    return fused


def _fuse_traced_tree(module: nn.Module, backend: str, start: int) -> int:
    """Trace from the top; where tracing fails (or a module is a Sequential, handled above), try the children."""
    if isinstance(module, (nn.Sequential, _FusedChain)):
        return sum(_fuse_traced_tree(c, backend, start) for c in module.children())
    has_bn = any(isinstance(m, (nn.BatchNorm2d, nn.SyncBatchNorm)) for m in module.modules())
    if not has_bn:
        return 0
    found = _fuse_traced(module, backend, start)
    if found:
        return found
    total = 0
    for child in list(module.children()):
        total += _fuse_traced_tree(child, backend, start + total)
    return total


def unfuse(model: nn.Module) -> int:
    """Undo :func:`fuse_bn_relu_conv` and ``fused=True`` in place: plain BatchNorm -> ReLU -> Conv2d modules again.

    - ``FusedSequential`` containers become ``nn.Sequential`` (their fused-chain attributes dropped);
    - modules whose ``forward`` was replaced by a rewritten torch.fx graph get their class's ``forward`` back
      and lose the ``_fused_chain_*`` helpers (which hold no parameters or buffers);
    - models with a ``set_fused`` method (``widedeep``'s ResNet-38, by duck typing: this package imports
      nothing from widedeep) get ``set_recompute(None)`` when they have a recompute plan, then
      ``set_fused(False)``.

    Parameters, buffers, state_dict keys and optimizer state are untouched (the same tensors). The drop-in
    modules (``BNReLU``, ``BNReLUConv2d``, ``InPlaceABN``/``ABN``) stay: they are the user's own choice of layer,
    and they export as plain ops anyway (:mod:`kernels.plain`). Returns the number of modules changed.
    """
    changed = 0
    for module in list(model.modules()):
        if type(module) is FusedSequential:
            module.__class__ = nn.Sequential
            for attr in ("fused_starts", "fused_backend"):
                module.__dict__.pop(attr, None)
            changed += 1
        if "forward" in module.__dict__ and (
            isinstance(module.__dict__["forward"], _PerMode)
            or any(isinstance(c, _FusedChain) for c in module.children())
        ):
            del module.__dict__["forward"]
            for name in [n for n, c in module.named_children() if isinstance(c, _FusedChain)]:
                delattr(module, name)
            changed += 1
        plan = getattr(module, "recompute_plan", None)
        if callable(getattr(module, "set_fused", None)) and (plan or getattr(module, "_fused_backend", None)):
            if plan:
                module.set_recompute(None)
            module.set_fused(False)
            changed += 1
    return changed
