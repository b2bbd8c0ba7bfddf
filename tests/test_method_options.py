"""Method and selector options: each YAML in conf/method/ and conf/selector/ sets exactly its class's options
(none of which has a default in code), and a wrong option is a one-line error before anything runs."""

from __future__ import annotations

import dataclasses
import inspect
import typing

import pytest
from hydra.utils import get_class
from omegaconf import OmegaConf

from robustft import cli
from robustft.cli import CONF_DIR
from robustft.errors import UserError
from robustft.methods.base import HYDRA_KEYS, build_method, check_options, instantiate_method, method_options
from robustft.methods.rose import Rose
from tests.conftest import make_cfg


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))


CASES = [(group, option) for group in ("method", "selector") for option in options(group)]


@pytest.mark.parametrize("group,option", CASES)
def test_every_yaml_sets_exactly_its_class_options(group, option):
    node = make_cfg([f"{group}={option}"])[group]
    keys = {k for k in node if k not in HYDRA_KEYS}
    if "_target_" not in node:  # selector=none: nothing is built
        assert keys == {"name"}
        return
    cls = get_class(node._target_)
    takes, required = method_options(cls)
    assert keys == takes == required, f"{group}={option}: YAML {sorted(keys)} vs class {sorted(takes)}"
    params = inspect.signature(cls).parameters
    assert not any(p.kind is p.VAR_KEYWORD for p in params.values())  # no **options swallowing a typo
    hints = typing.get_type_hints(cls.__init__)
    for name in keys:  # options typed as a dataclass (ROSE's eligible): its fields, all set, none defaulted
        for sub in (t for t in (hints[name], *typing.get_args(hints[name])) if dataclasses.is_dataclass(t)):
            fields = dataclasses.fields(sub)
            assert set(node[name]) == {f.name for f in fields}
            assert all(f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING for f in fields)
    check_options(node, group)  # and the check the CLI runs accepts it
    build_method(make_cfg([f"{group}={option}"]))  # builds without a model


def test_runtime_arguments_are_not_options():
    takes, _ = method_options(Rose)
    assert "inner" not in takes  # the runner passes the wrapped method; a YAML must not
    with pytest.raises(UserError, match="unknown option 'selector.inner'"):
        check_options(OmegaConf.merge(OmegaConf.load(CONF_DIR / "method" / "rose.yaml"), {"inner": None}), "selector")


def one_line_exit(capsys, overrides: list[str]) -> str:
    with pytest.raises(SystemExit) as e:
        cli.preflight(overrides)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("robustft: error: ")
    return err.strip()


@pytest.mark.parametrize("overrides,expected", [
    (["+method.foo=1"], "unknown option 'method.foo' (method=vanilla takes name)"),
    (["method=rose", "+method.varaint=x"], "unknown option 'method.varaint'"),
    (["method=match_tuning", "+method.temprature=0.5"], "did you mean 'method.temperature'?"),
    (["method=match_tuning", "selector=rose", "+selector.uper=50"], "did you mean 'selector.upper'?"),
    (["method=rose", "+method.eligible.contain=[layer]"], "unknown option 'method.eligible.contain' (method.eligible"),
    (["+selector.variant=first"], "unknown option 'selector.variant' (selector=none takes name)"),
    (["method=ftft", "~method.fraction"], "method=ftft needs option(s) method.fraction"),
    (["-m", "method=vanilla,rose", "+method.upper=50"], "unknown option 'method.upper' (method=vanilla"),
])
def test_preflight_rejects_wrong_options_in_one_line(capsys, overrides, expected):
    line = one_line_exit(capsys, [o for o in overrides if not o.startswith("-")])
    assert expected in line, line


def test_preflight_accepts_the_real_options():
    cli.preflight(["method=rose", "method.variant=second", "method.eligible.excludes=[LayerNorm]"])
    cli.preflight(["method=match_tuning", "selector=rose", "selector.upper=50", "method.temperature=0.2"])
    cli.preflight(["method=ftft", "method.reference.model_overrides.num_layers=3", "trainer.eval_every=10"])


def test_instantiating_with_a_wrong_option_is_a_user_error(monkeypatch):
    rose_yaml = OmegaConf.load(CONF_DIR / "method" / "rose.yaml")
    with pytest.raises(UserError, match="unknown option 'method.varaint'"):
        instantiate_method(OmegaConf.merge(rose_yaml, {"varaint": "x"}), "method")
    # a bad value: the class's own UserError, not Hydra's multi-line InstantiationException
    with pytest.raises(UserError, match="rose variant='x'"):
        instantiate_method(OmegaConf.merge(rose_yaml, {"variant": "x"}), "method")
    with pytest.raises(UserError, match="method.temperature=0"):
        make = make_cfg(["method=match_tuning", "method.temperature=0"])
        build_method(make)
    # what a constructor raises besides UserError becomes one line too
    with pytest.raises(UserError, match=r"method=rose cannot be built \(TypeError: .*\); check its options"):
        instantiate_method(OmegaConf.merge(rose_yaml, {"eligible": "layer"}), "method")
    # the ftft reference node is free-form in the YAML: its keys are checked by the class
    with pytest.raises(UserError, match="unknown option 'method.reference.reuze'"):
        build_method(make_cfg(["method=ftft", "+method.reference.reuze=false"]))
    # the runner builds the method first: nothing is loaded for a wrong option
    import robustft.runner as runner

    def no_data(*args, **kwargs):
        raise AssertionError("data loaded before the method's options were checked")

    monkeypatch.setattr(runner, "load_task", no_data)
    with pytest.raises(UserError, match="unknown option 'method.foo'"):
        runner.fit(make_cfg(["+method.foo=1"]), run=None)
