"""The package version (a leaf module: anything may import it without importing weightlens)."""

__version__ = "0.6.0"
