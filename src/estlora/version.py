"""estlora's version, apart from the package's `__init__` so that any module can name it without a cycle."""

__version__ = "0.1.0"
