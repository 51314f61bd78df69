"""One argument specification per fused op, and both of its paths generated from it.

A fused op (``bn_act`` in :mod:`kernels.bn_relu`, ``bn_act_conv`` in :mod:`kernels.bn_relu_conv`) is written once
as an :class:`OpSpec`: its arguments (:class:`Arg`: name, op-schema type, differentiable or not, read by the
backward or not), a forward and a backward implementation that read the arguments *by name* from one namedtuple,
and a shape-only forward. From it come

- :meth:`OpSpec.function`: the eager ``torch.autograd.Function`` (what eager code runs: the lowest host cost,
  measured at half of a custom op's dispatch in ``python -m bench.host``'s setting);
- :meth:`OpSpec.register`: the ``torch.library`` custom op and its backward op, their fake implementations and the
  autograd registration (what ``torch.compile`` sees: one opaque node each; :mod:`kernels.ops` registers them).

Both call the same implementations with the same named arguments, so their values are identical, and a new
argument is one :class:`Arg` plus the implementation lines that read it: the Function's signature and ``None``
padding, the schemas, both fakes and the op's ``setup_context`` follow from the spec
(``tests/test_opspec.py`` adds one to a toy spec and runs both paths).

Where the two paths carry an argument differently, the spec says so once:

- an eager caller may pass an argument already decoded (the BN statistics as a :class:`kernels.bn_relu.BNParams`
  where the op has the packed STAT_ROWS tensor; conv geometry as tuples where the op has ``SymInt[]``):
  ``Arg.decode(args)`` turns either form into what the implementations read;
- eager-only arguments (``type=None``: a process group cannot be an op argument) take ``Arg.default`` in the op;
- ``Tensor[]`` arguments reach the Function flattened after the others, behind a tuple of their lengths (autograd
  tracks only tensors passed directly);
- the eager forward may stash replacements for its backward (``stash``: the convolution weights it already cast to
  the autocast dtype, so backward does not cast again); the op path recomputes them.

Op conventions (generic, so no spec restates them): outputs take the layout ``OpSpec.layout(args)`` names; the
backward op returns one gradient per differentiable argument in that argument's dtype and layout (an empty tensor
for an absent optional one: an op cannot return None), never aliasing an input or another output; an output that
received no gradient gets zeros (the op needs one tensor per output).
"""

from __future__ import annotations

import collections
from dataclasses import dataclass
from typing import Any, Callable

import torch

# the schema types an Arg may have (None: eager-only)
TYPES = ("Tensor", "Tensor?", "Tensor[]", "bool", "bool[]", "float", "int", "SymInt[]", "str", "ScalarType", None)

_TENSOR_TYPES = ("Tensor", "Tensor?", "Tensor[]")
_C_APPLY = torch._C._FunctionBase.__dict__["apply"]
_transforms_active = torch._C._are_functorch_transforms_active


@dataclass(frozen=True)
class Arg:
    """One argument of a fused op.

    ``type``: its op-schema type (:data:`TYPES`), or None for an eager-only argument (``default`` in the op).
    ``grad``: differentiable (tensors only): the backward returns its gradient (a list for ``Tensor[]``).
    ``saved``: the backward reads it (tensors go through ``save_for_backward``: version checks and saved-tensor
    hooks such as checkpointing see them; other arguments are kept on ``ctx``; an argument with a ``decode`` is
    kept on the eager ``ctx`` decoded, e.g. the BNParams, and saved as a tensor on the op path).
    ``decode``: ``f(args) -> value`` the implementations read, given the namedtuple of all arguments (called on
    both paths: it must accept the op's encoding and an eager caller's decoded value)."""

    name: str
    type: str | None
    grad: bool = False
    saved: bool = False
    decode: Callable | None = None
    default: Any = None

    def __post_init__(self):
        if self.type not in TYPES:
            raise ValueError(f"Arg {self.name!r}: type {self.type!r} is not one of {TYPES}")
        if self.grad and self.type not in ("Tensor", "Tensor?", "Tensor[]"):
            raise ValueError(f"Arg {self.name!r}: only tensors are differentiable, not {self.type}")


def memory_format(t: torch.Tensor) -> torch.memory_format:
    """channels_last for a 4-D channels_last tensor that is not also NCHW-contiguous, else contiguous_format."""
    cl = t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last) and not t.is_contiguous()
    return torch.channels_last if cl else torch.contiguous_format


class OpSpec:
    """A fused op: arguments, implementations, and the generated eager Function and custom ops.

    ``forward(a, stash) -> output(s)``: ``a`` the decoded argument namedtuple; ``stash`` a dict on the eager path
    (entries, named after arguments, replace them for the backward), None on the op path.
    ``backward(a, grads, needs) -> {name: gradient}``: ``grads`` one per output (zeros for unused outputs on the
    op path, as autograd materialises them on the eager path); ``needs`` {name: bool, or a list for
    ``Tensor[]``}; absent names mean no gradient. Gradients in their argument's dtype.
    ``stashes``: the argument names ``forward`` may put in ``stash``.
    ``fake(a) -> output(s)``: shapes and dtypes only (the layout follows ``layout``).
    ``layout(a) -> memory_format`` of the op's outputs. ``returns``: "Tensor" or "Tensor[]"."""

    def __init__(self, name: str, args, *, forward, backward, fake, layout, returns: str = "Tensor", stashes=()):
        if returns not in ("Tensor", "Tensor[]"):
            raise ValueError(f"returns must be 'Tensor' or 'Tensor[]', got {returns!r}")
        self.name, self.args, self.returns = name, tuple(args), returns
        self.forward_impl, self.backward_impl, self.fake_impl, self.layout = forward, backward, fake, layout
        self.names = [a.name for a in self.args]
        self.stashes = tuple(stashes)  # the arguments the eager forward may replace for the backward
        if set(self.stashes) - set(self.names):
            raise ValueError(f"{name}: stashes {sorted(set(self.stashes) - set(self.names))} are not arguments")
        if len(set(self.names)) != len(self.names):
            raise ValueError(f"{name}: argument names repeat")
        self.Args = collections.namedtuple(f"{name}_args", self.names)
        self.index = {n: i for i, n in enumerate(self.names)}
        self.decoders = [(i, a.decode) for i, a in enumerate(self.args) if a.decode is not None]
        self.fixed = [i for i, a in enumerate(self.args) if a.type != "Tensor[]"]  # the Function's leading args
        self.lists = [i for i, a in enumerate(self.args) if a.type == "Tensor[]"]  # flattened after them
        self.grads = [i for i, a in enumerate(self.args) if a.grad]
        self.saved_tensors = [i for i, a in enumerate(self.args) if a.saved and a.type in ("Tensor", "Tensor?")]
        self.saved_lists = [i for i, a in enumerate(self.args) if a.saved and a.type == "Tensor[]"]
        # what the backward never reads, dropped from ctx (no activation kept alive outside save_for_backward)
        self.dropped = [i for i, a in enumerate(self.args) if a.type in _TENSOR_TYPES and not a.saved]
        self.op_args = [i for i, a in enumerate(self.args) if a.type is not None]
        # built here, not on first use: a first call under Dynamo (SyncBN blocks, which keep the eager Function
        # while compiling) must not trace exec/compile/type()
        self._function, self._apply = _make_function(self)

    # ------------------------------------------------------------------------------------------------------------
    # shared

    def decode(self, values: list) -> tuple:
        """The namedtuple the implementations read, from the argument values in spec order."""
        a = self.Args._make(values)
        changed = False
        for i, dec in self.decoders:
            v = dec(a)
            if v is not values[i]:  # eager callers pass decoded values: usually nothing to rebuild
                values[i], changed = v, True
        return self.Args._make(values) if changed else a

    def schema(self) -> str:
        """The forward op's schema, e.g. ``(Tensor x, Tensor stats, ...) -> Tensor``."""
        return f"({', '.join(f'{self.args[i].type} {self.args[i].name}' for i in self.op_args)}) -> {self.returns}"

    def backward_op_args(self) -> list[int]:
        """Arguments of the backward op after ``grads``: what the backward reads (saved tensors, every non-tensor)
        and the differentiable ones (their gradients take their shapes, dtypes and layouts: what the fake says)."""
        return [i for i in self.op_args if i not in self.dropped or self.args[i].grad]

    def backward_schema(self) -> str:
        ins = ", ".join(f"{self.args[i].type} {self.args[i].name}" for i in self.backward_op_args())
        outs = ", ".join("Tensor[]" if self.args[i].type == "Tensor[]" else "Tensor" for i in self.grads)
        return f"(Tensor[] grads, {ins}) -> ({outs})"

    # ------------------------------------------------------------------------------------------------------------
    # eager: the autograd Function

    def function(self) -> type:
        """The eager ``torch.autograd.Function`` (built once). Arguments: the non-list arguments in spec order,
        then (if the op has ``Tensor[]`` arguments) a tuple of their lengths and their tensors, concatenated."""
        return self._function

    @property
    def apply(self) -> Callable:
        """``apply(*values)``: the eager Function applied to the argument values in spec order (``Tensor[]`` as
        lists; flattened for autograd here). It skips ``Function.apply``'s Python wrapper where that does nothing:
        the wrapper binds default arguments (only for a ``setup_context`` Function; this one has none) and unwraps
        functorch wrappers (only meaningful under vmap/grad/...: then the full path runs). ~7 us of host time per
        call, once per BN per step."""
        return self._apply

    # ------------------------------------------------------------------------------------------------------------
    # compile: the custom ops

    def register(self, ns: str, tags=()) -> Any:
        """Define ``ns::name`` and ``ns::name_backward`` with their fakes and autograd; returns the forward op."""
        return _register(self, ns, tuple(tags))


def function_source(spec: OpSpec) -> str:
    """The Python source of the eager Function's ``forward``, ``backward`` and ``apply`` for ``spec``: straight-line
    code written for this spec's arguments (a generic loop over the arguments cost ~7 us more per BN-ReLU forward +
    backward on the host). ``print(function_source(BN_ACT))`` shows it.

    The Function's inputs: a tuple of the arguments autograd need not see (non-tensors, decoded arguments), then
    the differentiable and saved tensors, then, if any, the lengths of the ``Tensor[]`` arguments and their tensors.
    Fewer autograd inputs cost less in ``apply`` and in the engine's backward."""
    names, args = spec.names, spec.args
    direct = [
        n
        for i, n in enumerate(names)
        if i in spec.fixed
        and (args[i].grad or (args[i].saved and args[i].decode is None and args[i].type in _TENSOR_TYPES))
    ]
    rest = [names[i] for i in spec.fixed if names[i] not in direct]
    lists = [names[i] for i in spec.lists]
    allv = ", ".join(names)
    tup = lambda ns: f"({', '.join(ns)}{',' if len(ns) == 1 else ''})"  # noqa: E731
    sig = ", ".join(["ctx", "_rest", *direct, *(["_lens", "*_tail"] if lists else [])])
    f = [f"def forward({sig}):", f"    {tup(rest)} = _rest" if rest else "    pass"]
    if lists:
        f.append("    _k = 0")
        for j, n in enumerate(lists):
            f += [f"    {n} = list(_tail[_k : _k + _lens[{j}]])", f"    _k += _lens[{j}]"]
    f.append(f"    a = _Args({allv})")
    if spec.decoders:
        f.append("    _changed = False")
        for i, _ in spec.decoders:
            n = names[i]
            f += [f"    _v = _dec_{n}(a)", f"    if _v is not {n}:", f"        {n}, _changed = _v, True"]
        f += ["    if _changed:", f"        a = _Args({allv})"]
    f += [
        "    _stash = {}",
        "    _out = _forward_impl(a, _stash)",
        *(f"    {n} = _stash.get({n!r}, {n})" for n in spec.stashes),
        "    if type(_out) is list:",
        "        _out = tuple(_out)",
    ]
    saved_t = [names[i] for i in spec.saved_tensors if args[i].decode is None]
    saved_l = [names[i] for i in spec.saved_lists]
    f.append(f"    ctx.save_for_backward({', '.join([*saved_t, *(f'*{n}' for n in saved_l)])})")
    if saved_l:
        f.append(f"    ctx.lens = {tup([f'len({n})' for n in saved_l])}")
    kept = []
    for i, n in enumerate(names):
        if n in saved_t or n in saved_l or (i in spec.dropped and args[i].type != "Tensor[]"):
            kept.append("None")
        elif i in spec.dropped:  # a list the backward does not read: only its length
            kept.append(f"[None] * len({n})")
        else:
            kept.append(n)
    f += [f"    ctx.values = {tup(kept)}", "    return _out"]

    b = [
        "def backward(ctx, *grads):",
        "    if _grad_enabled():  # create_graph=True: this backward is not itself differentiable",
        f"        raise RuntimeError({spec.name + ': double backward (create_graph=True) is not supported'!r})",
        f"    {tup(names)} = ctx.values",
    ]
    if saved_t or saved_l:
        b.append("    _s = ctx.saved_tensors")
        for k, n in enumerate(saved_t):
            b.append(f"    {n} = _s[{k}]")
        if saved_l:
            b.append(f"    _k = {len(saved_t)}")
            for j, n in enumerate(saved_l):
                b += [f"    {n} = list(_s[_k : _k + ctx.lens[{j}]])", f"    _k += ctx.lens[{j}]"]
    b += [f"    a = _Args({allv})", "    _need = ctx.needs_input_grad"]
    entries = [f"{n!r}: _need[{k + 1}]" for k, n in enumerate(direct) if args[spec.index[n]].grad]
    b.append(f"    _needs = {{{', '.join(entries)}}}")
    if lists:
        b.append(f"    _p = {len(direct) + 2}")
        for n in lists:
            if args[spec.index[n]].grad:
                b.append(f"    _needs[{n!r}] = list(_need[_p : _p + len({n})])")
            b.append(f"    _p += len({n})")
    b += ["    _g = _backward_impl(a, grads, _needs).get"]
    outs = ["None", *(f"_g({n!r})" if args[spec.index[n]].grad else "None" for n in direct)]
    if lists:
        outs.append("None")
        for n in lists:
            g = args[spec.index[n]].grad
            outs.append(f"*(_g({n!r}) or [None] * len({n}))" if g else f"*[None] * len({n})")
    b.append(f"    return {tup(outs)}")
    flat = ", ".join(
        [tup(rest), *direct, *([tup([f"len({n})" for n in lists])] if lists else []), *(f"*{n}" for n in lists)]
    )
    a = [
        f"def apply({allv}):",
        "    if _transforms_active():",
        f"        return _Function.apply({flat})",
        f"    return _fast_apply({flat})",
    ]
    return "\n\n\n".join("\n".join(x) for x in (f, b, a)) + "\n"


def _make_function(spec: OpSpec) -> tuple[type, Callable]:
    env = {
        "_Args": spec.Args,
        "_transforms_active": _transforms_active,
        "_grad_enabled": torch.is_grad_enabled,
        # bound now: the eager Function calls the implementations the spec had when it was built (the op path looks
        # them up per call, which is what tests that wrap them rely on)
        "_forward_impl": spec.forward_impl,
        "_backward_impl": spec.backward_impl,
        **{f"_dec_{spec.names[i]}": dec for i, dec in spec.decoders},
    }
    exec(compile(function_source(spec), f"<opspec {spec.name}>", "exec"), env)
    Function = type(
        f"{spec.name}_function",
        (torch.autograd.Function,),
        {"forward": staticmethod(env["forward"]), "backward": staticmethod(env["backward"]), "spec": spec},
    )
    env["_Function"], env["_fast_apply"] = Function, _C_APPLY.__get__(None, Function)
    return Function, env["apply"]


def _register(spec: OpSpec, ns: str, tags: tuple):
    args, op_args = spec.args, spec.op_args
    bwd_args = spec.backward_op_args()
    defaults = [a.default for a in args]

    def full(op_values, positions) -> list:
        values = list(defaults)
        for i, v in zip(positions, op_values):
            values[i] = v
        return values

    def pin(outs, fmt):
        if spec.returns == "Tensor":
            return outs.contiguous(memory_format=fmt)
        return [o.contiguous(memory_format=fmt) for o in outs]

    def impl(*op_values):
        a = spec.decode(full(op_values, op_args))
        return pin(spec.forward_impl(a, None), spec.layout(a))

    def fake(*op_values):
        a = spec.Args._make(full(op_values, op_args))  # undecoded: fakes read shapes, dtypes and flags only
        return pin(spec.fake_impl(a), spec.layout(a))

    op = torch.library.custom_op(f"{ns}::{spec.name}", impl, mutates_args=(), schema=spec.schema(), tags=tags)
    op.register_fake(fake)

    def bwd_impl(grads, *op_values):
        a = spec.decode(full(op_values, bwd_args))
        needs = {}
        for i in spec.grads:
            v = a[i]
            needs[args[i].name] = [True] * len(v) if args[i].type == "Tensor[]" else v is not None
        got = spec.backward_impl(a, tuple(grads), needs)
        inputs = _tensors(op_values)
        seen = {t.untyped_storage().data_ptr() for t in (*inputs, *grads)}  # no output aliases an input
        outs = []
        for i in spec.grads:
            name, ref = args[i].name, a[i]
            g = got.get(name)
            if g is None and (ref if args[i].type == "Tensor[]" else ref is not None):
                raise RuntimeError(f"{spec.name}: the backward returned no gradient for {name!r}")
            if args[i].type == "Tensor[]":
                outs.append([_fresh(gi, r, seen) for gi, r in zip(g or (), ref)])
            else:  # an absent optional input: an empty tensor of the first input's dtype (as the fake says)
                outs.append(inputs[0].new_empty(0) if ref is None else _fresh(g, ref, seen))
        return tuple(outs)

    def bwd_fake(grads, *op_values):
        a = spec.Args._make(full(op_values, bwd_args))
        first, outs = _tensors(op_values)[0], []
        for i in spec.grads:
            ref = a[i]
            if args[i].type == "Tensor[]":
                outs.append([_like(r) for r in ref])
            else:
                outs.append(first.new_empty(0) if ref is None else _like(ref))
        return tuple(outs)

    bwd = torch.library.custom_op(
        f"{ns}::{spec.name}_backward", bwd_impl, mutates_args=(), schema=spec.backward_schema(), tags=tags
    )
    bwd.register_fake(bwd_fake)
    pos = {i: k for k, i in enumerate(op_args)}

    def setup_context(ctx, inputs, output):
        ctx.out_meta = [(o.shape, o.dtype, o.device) for o in ([output] if spec.returns == "Tensor" else output)]
        tensors = [inputs[pos[i]] for i in bwd_args if args[i].type in _TENSOR_TYPES]
        ctx.save_for_backward(*(t for v in tensors for t in (v if isinstance(v, (list, tuple)) else [v])))
        ctx.shapes = [len(v) if isinstance(v, (list, tuple)) else None for v in tensors]
        ctx.others = [inputs[pos[i]] for i in bwd_args if args[i].type not in _TENSOR_TYPES]
        ctx.present = [inputs[pos[i]] is not None for i in spec.grads]

    def backward(ctx, *grads):
        grads = grads[0] if spec.returns == "Tensor[]" else grads
        grads = [
            torch.zeros(shape, dtype=dt, device=dev) if g is None else g
            for g, (shape, dt, dev) in zip(grads, ctx.out_meta)
        ]
        saved, tensors, k = ctx.saved_tensors, [], 0
        for n in ctx.shapes:
            tensors.append(saved[k] if n is None else list(saved[k : k + n]))
            k += 1 if n is None else n
        it_t, it_o, values = iter(tensors), iter(ctx.others), []
        for i in bwd_args:
            values.append(next(it_t) if args[i].type in _TENSOR_TYPES else next(it_o))
        got = bwd(grads, *values)
        out = [None] * len(op_args)
        for g, i, present in zip(got, spec.grads, ctx.present):
            out[pos[i]] = (list(g) if args[i].type == "Tensor[]" else g) if present else None
        return tuple(out)

    op.register_autograd(backward, setup_context=setup_context)
    op.backward_op = bwd
    return op


def _tensors(values) -> list[torch.Tensor]:
    """The tensors among op argument values, lists flattened, in order."""
    flat = [t for v in values for t in (v if isinstance(v, (list, tuple)) else [v])]
    return [t for t in flat if isinstance(t, torch.Tensor)]


def _like(ref: torch.Tensor) -> torch.Tensor:
    return ref.new_empty(ref.shape).contiguous(memory_format=memory_format(ref))


def _fresh(g: torch.Tensor, ref: torch.Tensor, seen: set) -> torch.Tensor:
    """``g`` in ``ref``'s layout, copied if its storage is an input's or an earlier output's (an op's outputs must
    not alias; dgamma and dbeta are rows of one buffer on the triton backend)."""
    g = g.contiguous(memory_format=memory_format(ref))
    ptr = g.untyped_storage().data_ptr()
    if ptr in seen:
        g = g.clone()
        ptr = g.untyped_storage().data_ptr()
    seen.add(ptr)
    return g
