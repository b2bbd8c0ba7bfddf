"""Vanilla fine-tuning (ERM): the base Method unchanged, registered as `method=vanilla`."""

from robustft.methods.base import Method


class Vanilla(Method):
    """Cross-entropy (or MSE for regression) on the task labels; AdamW with linear warmup/decay."""
