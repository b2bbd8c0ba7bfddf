"""Search spaces: Hydra's sweep grammar (as in Hydra's own Optuna sweeper plugin) to Optuna distributions.

    interval(a, b)              float uniform on [a, b]; int(interval(a, b)) integers a..b
    tag(log, interval(a, b))    log-uniform (both ends > 0)
    choice(x, y, ...)           categorical
    range(a, b[, step])         integers a, a+step, ... < b (Python's range; float steps: a float grid)

Where this departs from Hydra's plugin: a plain comma list (`arm=a,b,c`) is not a categorical dimension of
one study but a grid dimension: every value gets its own study with the same trial budget (the tuned
protocol's equal budget per arm). Use `choice(a,b,c)` for a categorical dimension.

The space of a run is its config's `search` node (conf/search/method/<method>.yaml and
conf/search/selector/<selector>.yaml, mirrored key paths: `search.method.r3f_lambda` ranges
`method.r3f_lambda`), then `hydra.sweeper.params`, then the command line (`search.trainer.lr=...` or
`trainer.lr='tag(log,interval(1e-5,1e-3))'`); the later wins.
"""

from __future__ import annotations

import math
from typing import Any

from omegaconf import DictConfig, OmegaConf

from robustft.errors import UserError

FIX = "use interval(low, high), tag(log, interval(low, high)), choice(a, b, ...) or range(start, stop[, step])"


def flatten(node: Any, prefix: str = "") -> dict[str, str]:
    """`search` node -> {dotted key: grammar string}."""
    if node is None:
        return {}
    if isinstance(node, DictConfig):
        node = OmegaConf.to_container(node, resolve=True)
    if not isinstance(node, dict):
        return {prefix: str(node)}
    out: dict[str, str] = {}
    for key, value in node.items():
        out.update(flatten(value, f"{prefix}.{key}" if prefix else str(key)))
    return out


def parse(key: str, text: str) -> Any:
    """One search dimension (an Optuna distribution) from `key=text`; UserError in one line when it is bad."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    try:
        (override,) = OverridesParser.create().parse_overrides([f"{key}={text}"])
    except HydraException as e:
        raise UserError(f"cannot parse the range {key}={text} ({str(e).splitlines()[0][:120]}); {FIX}") from None
    return distribution(override)


def distribution(override: Any) -> Any:
    """A parsed sweep override -> FloatDistribution, IntDistribution or CategoricalDistribution."""
    from hydra.core.override_parser.types import Transformer
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    key, value, line = override.get_key_element(), override.value(), override.input_line
    if not override.is_sweep_override():
        raise UserError(f"range {line} is a single value, not a range; {FIX}")
    if override.is_interval_sweep():
        low, high, log = value.start, value.end, "log" in value.tags
        check_bounds(line, low, high, log)
        if isinstance(low, int) and isinstance(high, int):
            return IntDistribution(low, high, log=log)
        return FloatDistribution(float(low), float(high), log=log)
    if override.is_range_sweep():
        if value.step == 0 or not list(override.sweep_iterator()):
            raise UserError(f"range {line} is empty; use range(start, stop) with start < stop (stop excluded)")
        if all(isinstance(v, int) for v in (value.start, value.stop, value.step)) and value.step > 0:
            last = value.start + ((value.stop - 1 - value.start) // value.step) * value.step
            return IntDistribution(value.start, last, step=value.step)
    choices = tuple(override.sweep_iterator(transformer=Transformer.encode))
    if not choices:
        raise UserError(f"range {line} has no values; {FIX}")
    if any(not isinstance(c, (str, int, float, bool, type(None))) for c in choices):
        raise UserError(f"range {line} holds a list or dict; choice() takes plain values (numbers, strings)")
    if len(set(choices)) < len(choices):
        raise UserError(f"range {line} repeats a value; list each value of {key} once")
    return CategoricalDistribution(choices)


def check_bounds(line: str, low: Any, high: Any, log: bool) -> None:
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in (low, high)):
        raise UserError(f"range {line} needs two finite numbers; e.g. interval(0.1, 5.0)")
    if low >= high:
        raise UserError(f"range {line} has low >= high; write interval(low, high) with low < high")
    if log and low <= 0:
        raise UserError(f"range {line} is log-scaled but starts at {low}; a log range needs low > 0, "
                        "e.g. tag(log, interval(1e-5, 1e-3))")


def classify(lines: list[str]) -> tuple[dict[str, Any], dict[str, list[str]], dict[str, str]]:
    """Overrides -> (search dimensions, grid dimensions with their values, fixed override lines by key).

    `search.<key>=...` sets the range of <key>; a sweep function on any key makes it a dimension; a plain
    comma list is a grid dimension (one study per value); anything else is passed to every trial.
    """
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.core.override_parser.types import ChoiceSweep
    from hydra.errors import HydraException

    space: dict[str, Any] = {}
    grid: dict[str, list[str]] = {}
    fixed: dict[str, str] = {}
    try:
        parsed = OverridesParser.create().parse_overrides(lines)
    except HydraException as e:
        raise UserError(f"cannot parse overrides ({str(e).splitlines()[0][:160]}); {FIX}") from None
    for o in parsed:
        key = o.get_key_element()
        if key.startswith("search."):
            text = o.input_line.split("=", 1)[1]
            if o.is_sweep_override() or not isinstance(o.value(), str):
                space[key[len("search."):]] = distribution(o) if o.is_sweep_override() else parse(key, text)
            else:
                space[key[len("search."):]] = parse(key[len("search."):], o.value())
        elif o.is_sweep_override() and isinstance(o.value(), ChoiceSweep) and o.value().simple_form:
            grid[key] = [str(v) for v in o.sweep_string_iterator()]
        elif o.is_sweep_override():
            space[key] = distribution(o)
        else:
            fixed[key.lstrip("+~")] = o.input_line  # the whole line: `~key` deletions have no `=`
    return space, grid, fixed


def config_space(cfg: DictConfig) -> dict[str, Any]:
    """The `search` node of a composed job config as distributions (a string that is not a sweep: error)."""
    return {key: parse(key, text) for key, text in flatten(cfg.get("search")).items()}


def format_value(value: Any) -> str:
    """A sampled value as a Hydra override value (floats in full precision, strings quoted when needed)."""
    if isinstance(value, bool) or value is None:
        return {True: "true", False: "false", None: "null"}[value]
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, int):
        return str(value)
    text = str(value)
    if all(c.isalnum() or c in "_-./" for c in text):
        return text
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"
