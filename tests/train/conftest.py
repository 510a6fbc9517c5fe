"""Fixtures of the training tests: `ctrl_c_after_step` is in tests/conftest.py (the optimizer tests use it too)."""
