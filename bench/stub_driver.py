"""A stand-in Triton driver for measuring host cost without a GPU: target CUDA sm_90, no-op module load and launch.

Kernels go through Triton's real launch path: ``JITFunction.run`` (binder, specialisation, cache lookup, the
compile on a miss: TTIR -> PTX -> cubin with the ptxas bundled with Triton, which needs no GPU), then the real
``CudaLauncher.__call__`` (its Python: scratch allocation checks, argument packing). Only the C level is
replaced:

- ``utils.load_binary`` (cuModuleLoadData): a no-op returning a handle that names the kernel;
- ``utils.launch`` (3.9) / the per-signature C launcher (3.6): counts the launch by kernel name and returns; the C
  argument conversion (``data_ptr`` calls, ``cuPointerGetAttribute``) and ``cuLaunchKernel`` are skipped;
- ``utils.build_signature_metadata`` and ``PyKernelArg`` (3.9: what the C module gives ``CudaLauncher.__init__``
  once per compiled kernel): identity and plain namespaces, never read by the counting launch;
- ``utils.get_device_properties``: an H100 SXM's (132 SMs, 227 KiB shared memory per block, 64 Ki registers);
- device and stream getters: device 0, stream 0 (the null stream), capability (9, 0);
- ``get_current_target``: ``GPUTarget("cuda", 90, 32)``.

Supported Triton versions: :data:`SUPPORTED` (3.6: the GPU image's; 3.9: this machine's). They differ in the
launcher: 3.9's ``CudaLauncher.__init__`` is Python around one shared C ``launch`` (kept: it runs with the
stubbed utils), 3.6's compiles a C launcher per signature with gcc against libcuda (replaced by the same
attributes with the counting launch; ``__call__`` is the real one in both). Any other version: :func:`unsupported`
says why, and the callers skip with that message.
"""

from __future__ import annotations

import collections
import functools
import types

SUPPORTED = ("3.6", "3.9")

# An H100 SXM5 (sm_90): what kernel loading and the launchers' callers ask of the device.
H100_PROPERTIES = dict(
    max_shared_mem=232448,
    multiprocessor_count=132,
    max_num_regs=65536,
    warpSize=32,
    sm_clock_rate=1980000,
    mem_clock_rate=2619000,
    mem_bus_width=5120,
)
TARGET_ARCH, WARP_SIZE = 90, 32


def triton_version() -> str | None:
    try:
        import triton
    except ImportError:
        return None
    return triton.__version__


def unsupported() -> str | None:
    """None when the installed Triton is one the stub knows, else a one-line reason (the callers skip with it)."""
    v = triton_version()
    if v is None:
        return "triton is not installed (bench.host stubs Triton's CUDA driver)"
    if ".".join(v.split(".")[:2]) not in SUPPORTED:
        return (
            f"triton {v} is not supported by bench.host's stand-in driver (supported: "
            f"{', '.join(SUPPORTED)}): the launcher internals it stubs differ between versions"
        )
    try:
        from triton.backends.nvidia import driver as _nv  # noqa: F401
    except ImportError as e:
        return f"triton {v} has no NVIDIA backend to stub ({e})"
    return None


class LaunchCounter:
    """Launches per kernel name (the compiled kernel's name, e.g. ``_bn_relu_fwd_kernel``)."""

    def __init__(self):
        self.by_name: collections.Counter = collections.Counter()
        self.names: list[str] = []  # handle -> kernel name (the "function" load_binary returns)
        self.trace: list | None = None  # set to a list to record (function handle, grid) per launch

    def handle(self, name: str) -> int:
        self.names.append(name)
        return len(self.names) - 1

    def launch(self, gridX, gridY, gridZ, stream, function, *rest):
        # the C launcher's signature starts (gridX, gridY, gridZ, stream, function, ...) in 3.6 and 3.9
        self.by_name[self.names[function]] += 1
        if self.trace is not None:
            self.trace.append((function, (gridX, gridY, gridZ)))

    @property
    def total(self) -> int:
        return sum(self.by_name.values())

    def snapshot(self) -> collections.Counter:
        return collections.Counter(self.by_name)

    def reset(self) -> None:
        self.by_name.clear()


class _Utils:
    """The C ``cuda_utils`` module's entry points that the launch path calls, as no-ops."""

    def __init__(self, counter: LaunchCounter):
        self.counter = counter
        self.launch = counter.launch

    def load_binary(self, name, kernel, shared, device):
        # (module, function, n_regs, n_spills, n_max_threads)
        return name, self.counter.handle(name), 0, 0, 1024

    def unload_module(self, module):
        pass

    def get_device_properties(self, device):
        return dict(H100_PROPERTIES)

    def build_signature_metadata(self, signature):
        return signature

    def get_current_device(self):
        return 0

    def set_current_device(self, device):
        pass

    def get_default_stream(self, device):
        return 0

    def is_stream_capturing(self, stream):
        return False

    def get_device_capability(self, device):
        return (TARGET_ARCH // 10, TARGET_ARCH % 10)


# Check every C launch's argument layout (tests/test_launch_plans.py sets it before anything compiles); off for
# timing: the check is Python of its own that a real launch does not run
CHECK_LAYOUT = False


def _checked_launch(launch, n_args: int, version: str):
    """The C launch of one compiled kernel, refusing any call whose argument layout differs from the C launcher
    of that Triton version (what the real one would reject or misread), so that callers that enter the C launch
    directly (:mod:`kernels.launch`) are checked against it here:

    - 3.6: ``(gx, gy, gz, stream, function, coop, pdl, global_scratch, profile_scratch, kernel_metadata,
      launch_metadata, enter_hook, exit_hook, *args)``, the format ``"iiiKKppOOOOOO"`` + one per argument;
    - 3.9: ``(gx, gy, gz, stream, function, coop, pdl, kernel_metadata, launch_metadata, enter_hook, exit_hook,
      global_scratch, profile_scratch, arg_annotations, kernel_signature, args)``, args a tuple.

    ``n_args``: the kernel's signature length (constexprs included: both versions receive every argument).
    Returns ``launch`` itself unless :data:`CHECK_LAYOUT`."""
    if not CHECK_LAYOUT:
        return launch

    def checked(*a):
        grid_ok = len(a) > 5 and all(isinstance(v, int) and v > 0 for v in a[:3]) and isinstance(a[3], int)
        if version == "3.6":
            ok = grid_ok and len(a) == 13 + n_args and isinstance(a[9], tuple) and len(a[9]) == 3
        else:
            ok = (
                grid_ok
                and len(a) == 16
                and isinstance(a[7], tuple)
                and isinstance(a[15], tuple)
                and len(a[15]) == n_args
            )
        if not ok:
            raise TypeError(
                f"C launch called with an argument layout Triton {version} does not take: "
                f"{len(a)} arguments for a {n_args}-argument kernel"
            )
        return launch(*a)

    return checked


@functools.lru_cache(maxsize=None)
def _launcher_cls():
    """A CudaLauncher subclass whose C launch is the counter; ``__call__`` is Triton's own."""
    from triton.backends.nvidia import driver as nv

    version = ".".join(triton_version().split(".")[:2])

    class StubCudaLauncher(nv.CudaLauncher):
        def __init__(self, src, metadata):
            if version == "3.9":
                # Triton's own __init__: Python around the shared C launch, which the stub utils replace. Its
                # argument annotations are objects of the C module (set when CudaUtils is built): plain
                # stand-ins here, made once per compiled kernel and never read by the stub launch.
                if nv.PyKernelArg is None:
                    nv.PyKernelArg = types.SimpleNamespace
                    nv.ARG_CONSTEXPR, nv.ARG_KERNEL, nv.ARG_TUPLE = 0, 1, 2
                super().__init__(src, metadata)
                self.launch = _checked_launch(self.launch, len(src.signature), version)
                return
            # 3.6: the original builds a C launcher per signature (gcc + libcuda); keep everything else
            import triton

            signature = {idx: value for idx, value in src.signature.items()}
            tensordesc_meta = getattr(metadata, "tensordesc_meta", None)
            self.num_ctas = getattr(metadata, "num_ctas", 1)
            self.launch = _checked_launch(
                nv.wrap_handle_tensordesc(triton.runtime.driver.active.utils.launch, signature, tensordesc_meta),
                len(signature),
                version,
            )
            self.global_scratch_size = metadata.global_scratch_size
            self.global_scratch_align = metadata.global_scratch_align
            self.profile_scratch_size = metadata.profile_scratch_size
            self.profile_scratch_align = metadata.profile_scratch_align
            self.launch_cooperative_grid = metadata.launch_cooperative_grid
            self.launch_pdl = metadata.launch_pdl

    return StubCudaLauncher


def make_driver(counter: LaunchCounter):
    """A ``triton.backends.driver.DriverBase`` whose target is sm_90 and whose C level is :class:`_Utils`."""
    from triton.backends.compiler import GPUTarget
    from triton.backends.driver import DriverBase
    from triton.backends.nvidia import driver as nv

    class HostOnlyCudaDriver(DriverBase):
        def __init__(self):
            self.utils = _Utils(counter)
            self.launcher_cls = _launcher_cls()
            self.counter = counter

        @classmethod
        def is_active(cls):
            return False  # never picked by Triton's own driver discovery: installed with set_active only

        def map_python_to_cpp_type(self, ty: str) -> str:
            return nv.ty_to_cpp(ty)

        def get_current_target(self):
            return GPUTarget("cuda", TARGET_ARCH, WARP_SIZE)

        def get_active_torch_device(self):
            import torch

            return torch.device("cpu")  # the tensors the stub "launches" on are CPU tensors

        def get_device_interface(self):
            raise RuntimeError("bench.host's stand-in driver has no device interface")

        def get_benchmarker(self):
            raise RuntimeError("bench.host's stand-in driver cannot benchmark kernels (nothing runs)")

        def get_current_device(self):
            return 0

        def set_current_device(self, device):
            pass

        def get_current_stream(self, device=None):
            return 0

        def get_device_capability(self, device=None):
            return (TARGET_ARCH // 10, TARGET_ARCH % 10)

    return HostOnlyCudaDriver()


def install(counter: LaunchCounter | None = None):
    """Make the stand-in the active Triton driver (``triton.runtime.driver.set_active``); returns it."""
    import triton

    why = unsupported()
    if why:
        raise RuntimeError(why)
    drv = make_driver(counter or LaunchCounter())
    triton.runtime.driver.set_active(drv)
    return drv
