"""The command line's pre-flight: every swept value composed and checked before any run directory exists.

Hydra's own messages are several lines long and arrive after a sweep has started; these checks raise one
`UserError` line with the fix (unknown groups and options, wrong types, method/selector options against
their classes, robustft.validate's values, an output dir that cannot be written). robustft.cli prints it.
Only Hydra and omegaconf are imported up front: `robustft --help` and a mistyped option answer fast.
"""

from __future__ import annotations

from typing import Any

from omegaconf import DictConfig, OmegaConf

from robustft.config import CONF_DIR
from robustft.config import group_options as _group_options
from robustft.errors import UserError, excerpt


def _type_of_default(default: Any, value: Any) -> str | None:
    """Name of the expected type when `value` does not fit the default's type, else None."""
    if isinstance(default, bool):
        return None if isinstance(value, bool) else "true or false"
    if isinstance(default, int):
        return None if isinstance(value, int) and not isinstance(value, bool) else "a whole number"
    if isinstance(default, float):
        return None if isinstance(value, (int, float)) and not isinstance(value, bool) else "a number"
    return None


def _sweep_values(o) -> list[str] | None:
    """The values one parsed override takes (a sweep's several); None where only a sweeper can tell."""
    from hydra.core.override_parser.types import Glob
    from hydra.errors import HydraException

    if not o.is_sweep_override():
        return [o.get_value_element_as_str()]
    if isinstance(o.value(), Glob):  # glob(...) picks group options, as Hydra's sweeper does
        key = o.get_key_element().lstrip("+~")
        found = o.value().filter(_group_options(key))
        if not found:
            raise UserError(f"{o.input_line} matches no {key} option; choose from: {', '.join(_group_options(key))}")
        return found
    try:
        return [str(v) for v in o.sweep_string_iterator()]
    except HydraException:  # interval(...) etc.: only a sweeper plugin can enumerate it; leave it to Hydra
        return None


def parse_error(overrides: list[str], error: Exception) -> UserError:
    """Hydra's parse error as one line, with the quoting that works for the override it could not read.

    A sweep's run folder holds `=` (`.../trainer.epochs=1/seed=1`) and a folder name may hold accents or
    symbols; Hydra's grammar reads neither unquoted, and its message (a multi-line lexer report) does not
    say that `"key='value'"` (single quotes inside the shell's double quotes) is the way to pass them.
    """
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    first = str(error).splitlines()[0] if str(error) else type(error).__name__
    parser = OverridesParser.create()
    for item in overrides:
        try:
            parser.parse_overrides([item])
        except HydraException:
            key, eq, value = item.partition("=")
            if not eq:
                break
            quoted = value.replace("'", "\\'")  # Hydra's quoted value: only a quote needs its backslash
            return UserError(f"cannot parse override {excerpt(item)} ({excerpt(first)}); quote the value as "
                             f"\"{key}='{excerpt(quoted)}'\" (single quotes inside double quotes)")
    return UserError(f"cannot parse overrides ({excerpt(first)}); use key=value, e.g. task=rte trainer.epochs=3")


def check_syntax(overrides: list[str]) -> None:
    """Every override (hydra.* ones too, which Hydra would report as a multi-line lexer error) parses."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    try:
        OverridesParser.create().parse_overrides(overrides)
    except HydraException as e:
        raise parse_error(overrides, e) from None


def _variants(user: list[str]) -> list[list[str]]:
    """One override list with every override's first value, plus one per other swept value."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    try:
        parsed = OverridesParser.create().parse_overrides(user)
    except HydraException as e:
        raise parse_error(user, e) from None
    parsed = [o for o in parsed if _sweep_values(o) is not None]
    choices = [_sweep_values(o) for o in parsed]
    keys = [o.get_key_element() for o in parsed]  # keeps the +/++/~ prefix: `+arm=x` stays `+arm=x`
    base = [f"{k}={vals[0]}" for k, vals in zip(keys, choices, strict=False)]
    return [base] + [base[:i] + [f"{keys[i]}={v}"] + base[i + 1 :] for i, vals in enumerate(choices) for v in vals[1:]]


def _check_group_choices(variant: list[str]) -> None:
    for item in variant:
        key = item.split("=", 1)[0].lstrip("+~")
        if key in ("model", "task", "method", "trainer", "robustness") or (CONF_DIR / key).is_dir():
            value = item.split("=", 1)[1].strip("[]")
            for choice in filter(None, (v.strip() for v in value.split(","))):
                if choice not in _group_options(key) and choice != "null":
                    options = ", ".join(_group_options(key))
                    raise UserError(f"unknown {key} '{excerpt(choice)}'; choose one of: {options} "
                                    "(robustft --help lists every group)")


def _compose_checked(compose: Any, variant: list[str]) -> DictConfig:
    """Hydra's composition, its errors as one line."""
    from hydra.errors import HydraException, MissingConfigException

    try:
        return compose("config", overrides=variant)
    except MissingConfigException as e:
        raise UserError(f"{str(e).splitlines()[0]}; robustft --help lists the config groups and options") from None
    except HydraException as e:
        msg = str(e).splitlines()[0]
        if "not in struct" in msg or "Could not override" in msg:
            key = msg.split("'")[1] if "'" in msg else msg
            raise UserError(f"unknown option '{key}'; check the spelling "
                            "(robustft --cfg job prints every option)") from None
        raise UserError(f"{msg}; robustft --help shows the valid options") from None


def _check_values(cfg: DictConfig, variant: list[str], defaults: DictConfig, values: bool = True) -> None:
    """Method/selector options against their classes, each override's type, then robustft.validate.

    `values=False` (a sweep) leaves robustft.validate to each job (runner.fit runs it): a bad value then
    fails its own job with one line and the sweep's other jobs still run.
    """
    from robustft.methods.base import check_options
    from robustft.validate import validate

    # the method/selector keys against their classes' options (imports them, builds nothing)
    check_options(cfg.get("method"), "method")
    check_options(cfg.get("selector"), "selector")
    for item in variant:
        key, _, _ = item.lstrip("+~").partition("=")
        default = OmegaConf.select(defaults, key, default=None)
        expected = _type_of_default(default, OmegaConf.select(cfg, key, default=None))
        if expected:
            raise UserError(f"{key}={excerpt(repr(OmegaConf.select(cfg, key)))} has the wrong type; it takes {expected}")
    if not values:
        return
    validate(cfg)


def check(overrides: list[str], multirun: bool) -> None:
    """Compose the config once per swept value so unknown options, groups, wrong types and (outside a
    sweep, `multirun` False) bad values (robustft.validate) fail fast, then check that the run (or sweep)
    dir can be written. Method and selector options are checked against their classes' signatures too
    (`+method.foo=1`)."""
    from hydra import compose, initialize_config_dir

    check_syntax(overrides)
    variants = _variants([o for o in overrides if not o.lstrip("+~").startswith("hydra")])
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        defaults = OmegaConf.create(OmegaConf.to_container(compose("config"), resolve=False))
        for variant in variants:
            _check_group_choices(variant)
            _check_values(_compose_checked(compose, variant), variant, defaults, values=not multirun)
        hydra_overrides = [o for o in overrides if o.lstrip("+~").startswith("hydra")]
        check_output_dir(variants[0] + hydra_overrides, multirun)
        if multirun:
            check_slurm_request(variants[0] + hydra_overrides)


def check_output_dir(overrides: list[str], multirun: bool) -> None:
    """UserError when hydra.run.dir (hydra.sweep.dir with -m) is under a file, not writable, or on a full disk."""
    from hydra import compose
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from robustft import rundir

    key = "hydra.sweep.dir" if multirun else "hydra.run.dir"
    try:
        path = OmegaConf.select(compose("config", overrides=overrides, return_hydra_config=True), key)
    except (HydraException, OmegaConfBaseException, ValueError):
        return  # e.g. a dir built with ${hydra:...}: only a running Hydra can resolve it, and it will report
    rundir.check_output_dir(str(path), key)


def check_slurm_request(overrides: list[str]) -> None:
    """With hydra/launcher=slurm: a request larger than the partition's nodes (sinfo) is one line, not a job
    that pends forever (robustft.slurm.check_request)."""
    from hydra import compose
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    try:
        launcher = compose("config", overrides=overrides, return_hydra_config=True).hydra.launcher
        if str(launcher.get("_target_", "")) != "hydra_plugins.robustft_slurm.launcher.SlurmLauncher":
            return
        launcher = OmegaConf.create(OmegaConf.to_container(launcher, resolve=False))
    except (HydraException, OmegaConfBaseException, ValueError):
        return  # Hydra will report it
    from robustft.slurm import check_request

    check_request(launcher)
