"""Server strategies over a shared heterogeneous-EEN base, selected by name.

Every module in this package is imported once here, so a strategy registers itself (and its
option group) just by existing; nobody has to remember to list it.
"""
import importlib
import pkgutil

from strategies.registry import available, get, option_classes, register

_SUPPORT = {"base", "registry", "nodes", "generator_kd", "kd_losses", "routing"}
for _mod in pkgutil.iter_modules(__path__):
    if _mod.name not in _SUPPORT and not _mod.name.startswith("_"):
        importlib.import_module(f"{__name__}.{_mod.name}")

__all__ = ["available", "get", "option_classes", "register"]
