"""``register_timm``: register the plain names with timm now. Importing this module imports nothing (not timm).

It sits between :mod:`widedeep._timm_hook` (which calls it when timm gets imported) and :mod:`.timm_compat`
(the timm entrypoints), so the imports run one way: ``_timm_hook`` -> ``models.timm_registration`` ->
``models.timm_compat`` -> ``models.factory`` / ``models.registry``; nothing in ``widedeep.models`` imports
``_timm_hook``.
"""

from __future__ import annotations

import logging


def register_now() -> bool:
    """Import :mod:`.timm_compat` (which imports timm) and register. False when timm fails to import."""
    try:
        from . import timm_compat  # lazy on purpose: it imports timm (heavy and optional)
    except ImportError:
        return False
    timm_compat.register()
    return True


def register_timm() -> bool:
    """Register the plain names with timm now (importing timm). False when timm is missing or broken (it needs
    a matching torchvision). Not needed after ``import widedeep``, which registers as soon as timm is imported."""
    try:
        return register_now()
    except Exception as e:  # timm present but broken
        logging.getLogger("widedeep.models.registry").warning("timm registration failed: %r", e)
        return False
