"""Experiment trackers for `logger=[...]`: see robustft/loggers/base.py and docs/trackers.md."""
