"""robustft: an experiment runner for robust fine-tuning of pretrained language models."""

__version__ = "0.1.0"
