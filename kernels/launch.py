"""Lean kernel launches: a compiled Triton kernel called directly once its specialisation is known.

``kernel[grid](*args)`` goes through ``JITFunction.run`` on every call: argument binding, specialisation of every
argument (dtypes, 16-byte alignment, integer divisibility), a cache-key computation and lookup: about 8.5 us of
host time per launch. The launchers of this package know what decides the specialisation (shapes, dtypes,
layout, constexprs, pointer alignment, device), so they name it in a *plan key* and hold a :class:`Slot` per key:
the slot's first launch goes through ``JITFunction.run`` (compiling if needed) and keeps the compiled kernel it
returns; later launches call it directly on the current stream. A different shape, dtype, layout, device or
alignment is a different key, hence a different slot, so a slot never launches a kernel specialised for other
arguments (``tests/test_launch_plans.py`` alternates them through Triton's real launch path).

Two depths of "directly", chosen once per compiled kernel:

- the C launch function of Triton's ``CudaLauncher`` (``launcher.launch``) with the argument layout of the
  Triton versions in :data:`C_LAUNCH_LAYOUTS` (3.6, our GPU image's, and 3.9), when the kernel needs no global or
  profile scratch and no sanitizer: ~0.3 us, what Triton's own ``CudaLauncher.__call__`` ends in after building
  its closures (~1.5 us);
- elsewhere ``CompiledKernel.run(grid0, grid1, grid2, stream, function, packed_metadata, launch_metadata,
  enter_hook, exit_hook, *args)``, the interface of Triton 3.4 through 3.9.

Under the interpreter, with Triton < 3.4, or while a launch hook is installed (profilers), every launch takes the
ordinary ``kernel[grid](...)`` path.
"""

from __future__ import annotations

from ._runtime import HAS_TRITON, INTERPRET

if HAS_TRITON:
    import triton

    try:
        from triton import knobs as _knobs
    except ImportError:  # Triton < 3.4: no direct path
        _knobs = None
    _VERSION = ".".join(triton.__version__.split(".")[:2])
else:
    _knobs, _VERSION = None, None

# Argument layout of the C launch per Triton version (``launcher.launch``), checked against Triton's source of
# each: 3.6 ``launch(gx, gy, gz, stream, function, coop, pdl, global_scratch, profile_scratch, kernel_metadata,
# launch_metadata, enter_hook, exit_hook, *args)``; 3.9 ``launch(gx, gy, gz, stream, function, coop, pdl,
# kernel_metadata, launch_metadata, enter_hook, exit_hook, global_scratch, profile_scratch, arg_annotations,
# kernel_signature, args)``.
C_LAUNCH_LAYOUTS = ("3.6", "3.9")

# False: every launch takes Triton's ordinary path (tests compare the two; a debugging switch)
DIRECT = True


def _idle(hook) -> bool:
    """No launch hook installed: None (Triton 3.4-3.6) or an empty HookChain (3.7+)."""
    return hook is None or (hasattr(hook, "calls") and not hook.calls)


def hooks_idle() -> bool:
    """No launch enter/exit hook is installed (profilers install them; they need Triton's own path)."""
    rt = _knobs.runtime
    return _idle(rt.launch_enter_hook) and _idle(rt.launch_exit_hook)


def _c_launch(ck):
    """A callable ``f(gx, gy, gz, stream, *args)`` that enters the kernel's C launch directly, or None where that
    is not known to be exact (other Triton versions, scratch buffers, sanitizer, a launcher without ``launch``)."""
    launcher = ck.run
    meta = ck.metadata
    if _VERSION not in C_LAUNCH_LAYOUTS or not hasattr(launcher, "launch"):
        return None
    if (
        getattr(meta, "global_scratch_size", 0)
        or getattr(meta, "profile_scratch_size", 0)
        or getattr(launcher, "gsan_enabled", False)
    ):
        return None
    c, fn, pm = launcher.launch, ck.function, ck.packed_metadata
    coop, pdl = launcher.launch_cooperative_grid, launcher.launch_pdl
    if _VERSION == "3.6":

        def direct(gx, gy, gz, stream, *args):
            c(gx, gy, gz, stream, fn, coop, pdl, None, None, pm, None, None, None, *args)
    else:
        ann, sig = launcher.arg_annotations, launcher.kernel_signature

        def direct(gx, gy, gz, stream, *args):
            c(gx, gy, gz, stream, fn, coop, pdl, pm, None, None, None, None, None, ann, sig, args)

    return direct


def _run_launch(ck):
    run, fn, pm = ck.run, ck.function, ck.packed_metadata

    def direct(gx, gy, gz, stream, *args):
        run(gx, gy, gz, stream, fn, pm, None, None, None, *args)

    return direct


class Slot:
    """One launch plan: a kernel, its grid and warps, and (after the first launch) the compiled kernel's direct
    entry. ``slot(*args)`` launches with every argument in signature order, constexprs included."""

    __slots__ = ("kernel", "grid", "num_warps", "direct", "device")

    def __init__(self, kernel: "Kernel", grid: tuple, num_warps: int):
        self.kernel, self.grid, self.num_warps = kernel, grid, num_warps
        self.direct = self.device = None

    def __call__(self, *args):
        k = self.kernel
        k.launches += 1
        direct = self.direct
        if direct is not None and DIRECT and hooks_idle():
            driver = triton.runtime.driver.active
            device = driver.get_current_device()
            if device == self.device:
                g = self.grid
                direct(g[0], g[1], g[2], driver.get_current_stream(device), *args)
                return
        ck = k.fn[self.grid](*args, num_warps=self.num_warps)
        if (
            self.direct is None
            and ck is not None
            and not INTERPRET
            and _knobs is not None
            and all(hasattr(ck, a) for a in ("run", "function", "packed_metadata"))
        ):
            self.direct = _c_launch(ck) or _run_launch(ck)
            self.device = triton.runtime.driver.active.get_current_device()


class Kernel:
    """A ``@triton.jit`` function with launch plans.

    ``k.slot(key, grid, num_warps)``: the cached :class:`Slot` of ``key`` (anything hashable that determines the
    specialisation: the caller's shapes, dtypes, layout, constexprs, alignment, device index; the grid and warps
    are part of it). ``k(key, grid, *args, num_warps=...)``: one launch through the slot (key None: the ordinary
    path, never cached). ``launches`` counts launches (a cheap check for tests and bench.host)."""

    __slots__ = ("fn", "plans", "launches", "__name__")

    def __init__(self, fn):
        self.fn = fn
        self.plans: dict = {}
        self.launches = 0
        self.__name__ = getattr(fn, "__name__", None) or fn.fn.__name__

    def slot(self, key, grid: tuple, num_warps: int = 4) -> Slot:
        full = (key, grid, num_warps)
        s = self.plans.get(full)
        if s is None:
            s = self.plans[full] = Slot(self, tuple(grid), num_warps)
        return s

    def __call__(self, key, grid, *args, num_warps: int = 4):
        if INTERPRET or key is None:
            self.launches += 1
            self.fn[grid](*args, num_warps=num_warps)
            return
        self.slot(key, grid, num_warps)(*args)
