"""Differential privacy (docs/privacy.md)."""
