"""Lean kernel launches: a compiled Triton kernel called directly once its specialisation is known.

``kernel[grid](*args)`` goes through ``JITFunction.run`` on every call: argument binding, specialisation of every
argument (dtypes, 16-byte alignment, integer divisibility), a cache-key computation and lookup: about 8.5 us of
host time per launch, against ~0.6 us for calling the cached ``CompiledKernel``'s launcher. The launchers of this
package know what decides the specialisation (shapes, dtypes, layout, constexprs, pointer alignment, device), so
they name it in a *plan key*: the first launch with a key goes through ``JITFunction.run`` (compiling,
autotuning nothing) and keeps the compiled kernel it returns; later launches with the same key call it directly,
on the current stream. A different shape, dtype, layout, device or alignment is a different key (a new
compile or cache hit in Triton), so a plan can never launch a kernel specialised for other arguments.

The direct call uses ``CompiledKernel.run(grid0, grid1, grid2, stream, function, packed_metadata,
launch_metadata, enter_hook, exit_hook, *args)`` with every argument (constexprs included, in signature order):
the interface of Triton 3.4 through 3.9 (3.6 on our GPU image). Elsewhere, under the interpreter, or while a
launch hook is installed (profilers), every launch takes the ordinary path.
"""

from __future__ import annotations

from ._runtime import HAS_TRITON, INTERPRET

if HAS_TRITON:
    import triton

    try:
        from triton import knobs as _knobs
    except ImportError:  # Triton < 3.4: no direct path
        _knobs = None


def _idle(hook) -> bool:
    """No launch hook installed: None (Triton 3.4-3.6) or an empty HookChain (3.7+)."""
    return hook is None or (hasattr(hook, "calls") and not hook.calls)


def _direct_ok(ck) -> bool:
    return _knobs is not None and all(hasattr(ck, a) for a in ("run", "function", "packed_metadata"))


class Kernel:
    """A ``@triton.jit`` function with launch plans: ``k(key, grid, *args, num_warps=...)``.

    ``key``: anything hashable that determines the specialisation (the caller's shapes, dtypes, layout,
    constexprs, alignment, device index); ``grid``: a 3-tuple of ints; ``args``: every argument in signature
    order, constexprs included. ``launches`` counts calls (a cheap check for tests and bench.host)."""

    __slots__ = ("fn", "plans", "launches", "__name__")

    def __init__(self, fn):
        self.fn = fn
        self.plans: dict = {}
        self.launches = 0
        self.__name__ = getattr(fn, "__name__", None) or fn.fn.__name__

    def __call__(self, key, grid, *args, num_warps: int = 4):
        self.launches += 1
        if INTERPRET or key is None:
            self.fn[grid](*args, num_warps=num_warps)
            return
        plan = self.plans.get(key)
        driver = triton.runtime.driver.active
        if plan is not None and _idle(_knobs.runtime.launch_enter_hook) and _idle(_knobs.runtime.launch_exit_hook):
            ck, device = plan
            if driver.get_current_device() == device:
                ck.run(grid[0], grid[1], grid[2], driver.get_current_stream(device), ck.function,
                       ck.packed_metadata, None, None, None, *args)
                return
        ck = self.fn[grid](*args, num_warps=num_warps)
        if ck is not None and _direct_ok(ck):
            self.plans[key] = (ck, driver.get_current_device())
