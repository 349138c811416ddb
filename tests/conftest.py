"""Shared test settings: CPU, 8 forced host devices (set by the Makefile), quiet progress bars."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("LANDSCAPE_QUIET", "1")
