"""Architectures only: no file paths, no downloads, no registry."""
