"""qrobust's version, in a module of its own so that any layer can record it without importing the package
facade (``qrobust/__init__.py``), which re-exports names from every layer."""

__version__ = "0.1.0"
