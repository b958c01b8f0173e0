"""The package version, importable by every layer without importing the rest of attnc."""

__version__ = "0.1.0"
