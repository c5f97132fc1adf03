"""Diagnostics in plain torch (no Lightning import): one module per quantity."""
