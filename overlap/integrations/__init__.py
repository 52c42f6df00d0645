"""Integrations with other libraries, each loaded only when that library is.

Owns: `install_hooks()`, which `import overlap` calls once: it makes
``ep_implementation="overlap"`` known to transformers in every process that imports overlap
(a script, a torchrun rank, a spawned rank: `overlap.launch` ranks import it), whichever of the
two is imported first, without importing transformers itself. transformers has no plugin entry
point for EP implementations (`EPImplementationInterface.register` is the only way in), so:

- transformers' EP module already imported: `overlap.integrations.transformers` is imported now
  (its import registers ``"overlap"``);
- not yet: a one-shot import hook (a `sys.meta_path` finder) runs the same import right after
  ``transformers.distributed.expert_parallel`` has executed, and then removes itself.

A process that never imports overlap cannot know the name: import overlap (any module of it)
before loading a model, or call `overlap.integrations.transformers.register()`.
Never imports transformers on its own, and never fails transformers' import (a failed
registration is a warning, and the name then stays unknown).
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys
import threading
import warnings
from collections.abc import Sequence
from types import ModuleType
from typing import Any

TRANSFORMERS_EP_MODULE = "transformers.distributed.expert_parallel"
_lock = threading.Lock()


def _register_with_transformers() -> None:
    module = sys.modules.get(f"{__name__}.transformers")
    if module is not None and getattr(getattr(module, "__spec__", None), "_initializing", False):
        return  # its import is what loaded transformers' EP module: it registers when it finishes
    try:
        from . import transformers as overlap_hf  # registers "overlap" on import

        overlap_hf.register()
    except Exception as exc:  # noqa: BLE001 - never break the user's import of transformers
        warnings.warn(
            f'overlap could not register ep_implementation="overlap" with transformers: {exc!r}',
            RuntimeWarning,
            stacklevel=2,
        )


class _RegisteringLoader(importlib.abc.Loader):
    """Runs the real loader, then registers (attributes other than the two below are the real one's)."""

    def __init__(self, inner: Any) -> None:
        self._inner = inner

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType | None:
        return self._inner.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        self._inner.exec_module(module)
        _register_with_transformers()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


class _AfterTransformersEP(importlib.abc.MetaPathFinder):
    """Finds transformers' EP module through the other finders and wraps its loader; one-shot."""

    def find_spec(
        self, fullname: str, path: Sequence[str] | None, target: ModuleType | None = None
    ) -> importlib.machinery.ModuleSpec | None:
        if fullname != TRANSFORMERS_EP_MODULE:
            return None
        with _lock:
            if self in sys.meta_path:
                sys.meta_path.remove(self)
        for finder in sys.meta_path:
            find = getattr(finder, "find_spec", None)
            spec = find(fullname, path, target) if find is not None else None
            if spec is not None:
                if spec.loader is not None and hasattr(spec.loader, "exec_module"):
                    spec.loader = _RegisteringLoader(spec.loader)
                return spec
        return None


def install_hooks() -> None:
    """Register ``"overlap"`` with transformers now or right after transformers' EP module is
    imported (see the module docstring). Idempotent; imports nothing."""
    with _lock:
        if TRANSFORMERS_EP_MODULE not in sys.modules:
            if not any(isinstance(f, _AfterTransformersEP) for f in sys.meta_path):
                sys.meta_path.insert(0, _AfterTransformersEP())
            return
    _register_with_transformers()
