"""Server strategies over a shared heterogeneous-EEN base, selected by name."""
from strategies.registry import available, get, register
from strategies import eefl  # noqa: F401  (registers the built-in strategies)

__all__ = ["available", "get", "register"]
