"""A small TextAttack-style attack framework: goal function, constraints, transformation, search.

Components are composed in YAML (conf/robustness/{textfooler,pwws,typo}.yaml) via `_target_`.
"""

from robustft.robustness.attack.attack import Attack, AttackResult, attack_metrics
from robustft.robustness.attack.evaluator import AttackEvaluator

__all__ = ["Attack", "AttackEvaluator", "AttackResult", "attack_metrics"]
