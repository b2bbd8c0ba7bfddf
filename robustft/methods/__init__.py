"""Fine-tuning methods. One module + one YAML in conf/method/ each; `Method` (ERM) is the base."""

from robustft.methods.base import Method, StepOutput, TrainContext

__all__ = ["Method", "StepOutput", "TrainContext"]
