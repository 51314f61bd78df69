"""Register the ResNet-38 names with timm when timm gets imported, without importing timm (or torch) here.

``import widedeep`` calls :func:`install`: if timm is already imported the names are registered at once;
else, if timm is installed, a meta-path finder waits for the first ``import timm`` (of any submodule too:
the package comes first) and registers right after timm's own ``__init__`` has run. Without timm nothing
happens. :func:`widedeep.models.register_timm` (in :mod:`widedeep.models.timm_registration`) registers
explicitly (importing timm). Nothing in :mod:`widedeep.models` imports this module: the imports run one way.
"""

from __future__ import annotations

import sys
import warnings


def _find_spec(name: str, path=None):
    """importlib.util.find_spec without importing importlib.util (and contextlib): ask the meta-path finders."""
    for finder in sys.meta_path:
        if finder is _FINDER or not hasattr(finder, "find_spec"):
            continue
        spec = finder.find_spec(name, path)
        if spec is not None:
            return spec
    return None


def register_now() -> bool:
    """Register with timm now (importing torch and timm). False when widedeep.models or timm fails to import."""
    try:  # lazy on purpose: `import widedeep` imports neither torch nor timm (tests/test_ecosystem.py)
        from widedeep.models import timm_registration
    except ImportError:
        return False
    return timm_registration.register_now()


class _RegisterAfterExec:  # an importlib Loader (no importlib.abc: it imports pathlib & co, ~40 ms)
    """Wraps timm's loader: runs it, restores it on the module, then registers."""

    def __init__(self, inner):
        self.inner = inner

    def create_module(self, spec):
        return self.inner.create_module(spec)

    def exec_module(self, module) -> None:
        try:
            self.inner.exec_module(module)
        finally:
            module.__loader__ = self.inner
            if module.__spec__ is not None:
                module.__spec__.loader = self.inner
        if "widedeep.models.timm_compat" in sys.modules:
            return  # timm imported by timm_compat itself (register_timm): it registers when done
        try:
            register_now()
        except Exception as e:  # never break `import timm`
            warnings.warn(f"widedeep: registering the ResNet-38 models with timm failed: {e!r}", stacklevel=2)

    def __getattr__(self, name):
        return getattr(self.inner, name)


class _TimmFinder:  # a MetaPathFinder
    def find_spec(self, fullname, path=None, target=None):
        if fullname != "timm":
            return None
        uninstall()
        spec = _find_spec(fullname, path)
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        spec.loader = _RegisterAfterExec(spec.loader)
        return spec


_FINDER = _TimmFinder()


def uninstall() -> None:
    while _FINDER in sys.meta_path:
        sys.meta_path.remove(_FINDER)


def install() -> str:
    """``"registered"`` (timm was imported), ``"hooked"`` (timm installed, not imported yet) or ``"no timm"``."""
    if "timm" in sys.modules:
        try:
            return "registered" if register_now() else "no timm"
        except Exception as e:
            warnings.warn(f"widedeep: registering the ResNet-38 models with timm failed: {e!r}", stacklevel=2)
            return "no timm"
    if _find_spec("timm") is None:
        return "no timm"
    if _FINDER not in sys.meta_path:
        sys.meta_path.insert(0, _FINDER)
    return "hooked"
