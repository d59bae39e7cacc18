"""Inert stand-ins for Megatron-Core modules that import triton unconditionally (0.18+).

Megatron-Core 0.18 and later import MoE paged-stash kernels (``import triton`` at module level)
from ``megatron.core``'s own package import and from the pipeline schedules. CPU builds of torch
have no triton, so ``import megatron.core`` fails before
:func:`megatron_simpo.platform.cpu.activate` can run. Dense models never call these kernels.

:func:`install` (run by ``import megatron_simpo``) puts a finder first on ``sys.meta_path``. It
answers only for the modules in :data:`TRITON_ONLY_MODULES`, and only when, at the moment Megatron
imports one, (1) triton is not importable, (2) CUDA is unavailable, and (3) the real module's
source imports triton at module level. Otherwise the normal import runs. It imports nothing
itself (not even torch) until Megatron-Core asks for one of those modules.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import importlib.util
import re
import sys
import types
from collections.abc import Sequence
from typing import Any

#: Modules that import triton unguarded: 0.18 ``moe/paged_stash.py``; 0.19
#: ``moe/ops/paged_stash.py`` (0.19's ``moe/paged_stash.py`` imports from it and stays real code
#: over inert kernels).
TRITON_ONLY_MODULES: tuple[str, ...] = (
    "megatron.core.transformer.moe.paged_stash",
    "megatron.core.transformer.moe.ops.paged_stash",
)

# ``import triton`` / ``from triton...`` at column 0: guarded imports (inside try:) are indented.
_UNGUARDED_TRITON = re.compile(r"^(import|from)\s+triton\b", re.MULTILINE)


class _Inert:
    """Answers any attribute or call with itself and is falsy (nothing 'enabled')."""

    def __call__(self, *args: Any, **kwargs: Any) -> _Inert:
        return self

    def __getattr__(self, name: str) -> _Inert:
        if name.startswith("__"):
            raise AttributeError(name)
        return self

    def __bool__(self) -> bool:
        return False


def _module_getattr(name: str) -> _Inert:
    # importlib probes dunders (__path__, __spec__, ...) with getattr: they must be missing.
    if name.startswith("__"):
        raise AttributeError(name)
    return _Inert()


def _triton_missing() -> bool:
    return importlib.util.find_spec("triton") is None


def _cuda_absent() -> bool:
    # Megatron-Core imported torch before reaching these modules, so this import is free.
    import torch

    return not torch.cuda.is_available()


def _imports_triton(fullname: str, path: Sequence[str] | None) -> bool:
    spec = importlib.machinery.PathFinder.find_spec(fullname, path)
    if spec is None or not spec.origin or not spec.origin.endswith(".py"):
        return False
    with open(spec.origin, encoding="utf-8") as f:
        return bool(_UNGUARDED_TRITON.search(f.read()))


def needs_stand_in(fullname: str, path: Sequence[str] | None = None) -> bool:
    """Whether ``fullname`` is a triton-only module that cannot import on this machine.

    Args:
        fullname: dotted module name.
        path: the parent package's ``__path__`` (None: looked up from ``sys.modules``).
    """
    if fullname not in TRITON_ONLY_MODULES or not _triton_missing() or not _cuda_absent():
        return False
    if path is None:
        parent = sys.modules.get(fullname.rpartition(".")[0])
        path = getattr(parent, "__path__", None)
        if path is None:
            parent_spec = importlib.util.find_spec(fullname.rpartition(".")[0])
            path = parent_spec.submodule_search_locations if parent_spec else None
    return _imports_triton(fullname, path)


class _StandInLoader(importlib.abc.Loader):
    def create_module(self, spec: importlib.machinery.ModuleSpec) -> types.ModuleType:
        module = types.ModuleType(spec.name, "inert CPU stand-in (megatron_simpo.platform)")
        module.__getattr__ = _module_getattr  # type: ignore[method-assign]
        return module

    def exec_module(self, module: types.ModuleType) -> None:
        pass


class _StandInFinder(importlib.abc.MetaPathFinder):
    def find_spec(
        self, fullname: str, path: Sequence[str] | None, target: types.ModuleType | None = None
    ) -> importlib.machinery.ModuleSpec | None:
        if not needs_stand_in(fullname, path):
            return None
        return importlib.machinery.ModuleSpec(fullname, _StandInLoader(), origin="stand-in")


_FINDER = _StandInFinder()


def install() -> None:
    """Puts the stand-in finder first on ``sys.meta_path`` (idempotent; imports nothing)."""
    if _FINDER not in sys.meta_path:
        sys.meta_path.insert(0, _FINDER)


def is_stand_in(module: types.ModuleType) -> bool:
    """Whether ``module`` was served by this finder."""
    spec = getattr(module, "__spec__", None)
    return spec is not None and isinstance(spec.loader, _StandInLoader)
