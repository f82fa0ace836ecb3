"""Pieces of the worker-process mode (``[proxy] workers``, SPEC 8)."""
