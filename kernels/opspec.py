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
    hooks such as checkpointing see them; other arguments are kept on ``ctx``).
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
    ``fake(a) -> output(s)``: shapes and dtypes only (the layout follows ``layout``).
    ``layout(a) -> memory_format`` of the op's outputs. ``returns``: "Tensor" or "Tensor[]"."""

    def __init__(self, name: str, args, *, forward, backward, fake, layout, returns: str = "Tensor"):
        if returns not in ("Tensor", "Tensor[]"):
            raise ValueError(f"returns must be 'Tensor' or 'Tensor[]', got {returns!r}")
        self.name, self.args, self.returns = name, tuple(args), returns
        self.forward_impl, self.backward_impl, self.fake_impl, self.layout = forward, backward, fake, layout
        self.names = [a.name for a in self.args]
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
        self._function = None

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
        if self._function is None:
            self._function = _make_function(self)
        return self._function

    def apply(self, *values):
        """``function().apply(*values)`` (see :meth:`function` for the argument order) without
        ``Function.apply``'s Python wrapper where it does nothing: it binds default arguments (only for a
        ``setup_context`` Function; this one has none) and unwraps functorch wrappers (only meaningful under
        vmap/grad/...: then the full path runs). ~7 us of host time per call, once per BN per step."""
        fn = self.function()
        if _transforms_active():
            return fn.apply(*values)
        return fn._fast_apply(*values)

    def flat(self, values: list) -> list:
        """The Function's arguments from all argument values in spec order (list arguments flattened)."""
        if not self.lists:
            return values
        lists = [values[i] for i in self.lists]
        return [*(values[i] for i in self.fixed), tuple(len(v) for v in lists), *(t for v in lists for t in v)]

    # ------------------------------------------------------------------------------------------------------------
    # compile: the custom ops

    def register(self, ns: str, tags=()) -> Any:
        """Define ``ns::name`` and ``ns::name_backward`` with their fakes and autograd; returns the forward op."""
        return _register(self, ns, tuple(tags))


def _make_function(spec: OpSpec) -> type:
    n_all, fixed, lists = len(spec.args), spec.fixed, spec.lists
    n_fixed = len(fixed)
    saved_t, saved_l, dropped = spec.saved_tensors, spec.saved_lists, spec.dropped
    index, forward_impl, backward_impl, names = spec.index, spec.forward_impl, spec.backward_impl, spec.names
    dropped_t = [i for i in dropped if spec.args[i].type != "Tensor[]"]
    dropped_l = [i for i in dropped if spec.args[i].type == "Tensor[]"]
    # (flat position, name) of the differentiable non-list arguments; (list index k, name) of the list ones
    grad_fixed = [(k, names[i]) for k, i in enumerate(fixed) if spec.args[i].grad]
    grad_lists = [(k, names[i]) for k, i in enumerate(lists) if spec.args[i].grad]
    Tensor = torch.Tensor

    def values_of(flat) -> list:
        if not lists:
            return list(flat)
        values = [None] * n_all
        for k, i in enumerate(fixed):
            values[i] = flat[k]
        pos = n_fixed + 1
        for i, n in zip(lists, flat[n_fixed]):
            values[i] = list(flat[pos : pos + n])
            pos += n
        return values

    class Function(torch.autograd.Function):
        @staticmethod
        def forward(ctx, *flat):
            values = values_of(flat)
            a = spec.decode(values)
            stash: dict = {}
            out = forward_impl(a, stash)
            if isinstance(out, list):  # autograd takes a tuple of outputs
                out = tuple(out)
            for name, v in stash.items():
                values[index[name]] = v
            # saved tensors through save_for_backward; a decoded object in a tensor's place (the BNParams) stays
            tensors, where = [], []
            for i in saved_t:
                v = values[i]
                if v is None or isinstance(v, Tensor):
                    tensors.append(v)
                    where.append(i)
                    values[i] = None
            lens = []
            for i in saved_l:
                tensors += values[i]
                lens.append(len(values[i]))
                values[i] = None
            for i in dropped_t:
                values[i] = None
            for i in dropped_l:
                values[i] = [None] * len(values[i])
            ctx.save_for_backward(*tensors)
            ctx.values, ctx.where, ctx.lens = values, where, lens
            return out

        @staticmethod
        def backward(ctx, *grads):
            values, saved = list(ctx.values), ctx.saved_tensors
            k = len(ctx.where)
            for j, i in enumerate(ctx.where):
                values[i] = saved[j]
            for i, n in zip(saved_l, ctx.lens):
                values[i] = list(saved[k : k + n])
                k += n
            a = spec.Args._make(values)
            need = ctx.needs_input_grad
            needs = {name: need[k] for k, name in grad_fixed}
            if lists:
                starts, pos = [], n_fixed + 1
                for i in lists:
                    starts.append(pos)
                    pos += len(values[i])
                for k, name in grad_lists:
                    i = lists[k]
                    needs[name] = list(need[starts[k] : starts[k] + len(values[i])])
            got = backward_impl(a, grads, needs)
            out = [None] * n_fixed
            for k, name in grad_fixed:
                out[k] = got.get(name)
            if lists:
                out.append(None)  # the lengths
                for i in lists:
                    g = got.get(names[i])
                    out += g if g is not None else [None] * len(values[i])
            return tuple(out)

    Function.__name__ = Function.__qualname__ = f"{spec.name}_function"
    Function._fast_apply = _C_APPLY.__get__(None, Function)
    return Function


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
        inputs = [t for v in op_values for t in (v if isinstance(v, (list, tuple)) else [v])]
        inputs = [t for t in inputs if isinstance(t, torch.Tensor)]
        outs, seen = [], {t.untyped_storage().data_ptr() for t in inputs}
        for i in spec.grads:
            name, ref = args[i].name, a[i]
            if args[i].type == "Tensor[]":
                outs.append([_fresh(g, r, seen) for g, r in zip(got[name], ref)])
            else:
                g = got.get(name)
                outs.append(inputs[0].new_empty(0) if ref is None or g is None else _fresh(g, ref, seen))
        return tuple(outs)

    def bwd_fake(grads, *op_values):
        a = spec.Args._make(full(op_values, bwd_args))
        outs = []
        for i in spec.grads:
            ref = a[i]
            if args[i].type == "Tensor[]":
                outs.append([_like(r) for r in ref])
            else:
                outs.append(grads[0].new_empty(0) if ref is None else _like(ref))
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
