"""Robustness evaluators: each is one class behind `Evaluator`, configured in conf/robustness/."""

from robustft.robustness.base import EvalContext, Evaluator, run_evaluators

__all__ = ["EvalContext", "Evaluator", "run_evaluators"]
