"""Every policy option's range and default are declared once (``fairbatching.config``): the CLI (its ``-o`` check
and ``fairbatching options``), the vLLM settings and the policy constructors all answer from that declaration."""

import inspect
import json
import math
import os
import subprocess
import sys

import pytest

from fairbatching.config import POLICY_CONFIGS, Option, options_of
from fairbatching.costmodel import load_profile
from fairbatching.errors import ConfigError
from fairbatching.integrations.vllm.settings import SchedulerSettings
from fairbatching.policies import POLICIES, make_policy
from fairbatching.validate import parse_policy_options

OPTIONS = [(policy, opt) for policy, config in POLICY_CONFIGS.items() for opt in options_of(config).values()]


def out_of_range(opt: Option) -> list:
    """Values the declaration refuses: the wrong type, and just past each end of its range."""
    if opt.kind is bool:
        return [3, "yes"]
    bad: list = ["many", math.nan, True]
    if opt.kind is int:
        bad.append(1.5)
    if opt.lo > -math.inf:
        bad.append(opt.lo if opt.lo_open else opt.lo - 1)
    if opt.hi < math.inf:
        bad.append(opt.hi + 1)
    if not opt.nullable:
        bad.append(None)
    return bad


@pytest.mark.parametrize(("policy", "opt"), OPTIONS, ids=[f"{p}.{o.name}" for p, o in OPTIONS])
def test_cli_vllm_settings_and_constructor_refuse_what_the_declaration_refuses(policy, opt):
    cost = load_profile().cost_model()
    must = f"{policy}.{opt.name}=.*: must be {opt.describe()}".replace("(", r"\(").replace(")", r"\)")
    must = must.replace("[", r"\[").replace("]", r"\]")
    for value in out_of_range(opt):
        assert not opt.accepts(value)
        with pytest.raises(ConfigError, match=f"^--policy-option {must}"):
            parse_policy_options([f"{policy}.{opt.name}={json.dumps(value)}"])
        with pytest.raises(ConfigError, match=f"^fairbatching scheduler: policy_options=.*: option {must}"):
            SchedulerSettings(policy=policy, policy_options={opt.name: value})
        with pytest.raises(ConfigError, match=f"^{must}"):
            POLICIES[policy](cost, **{opt.name: value})


@pytest.mark.parametrize("policy", list(POLICY_CONFIGS))
def test_constructors_read_the_declared_defaults_and_declare_none_of_their_own(policy):
    cls = POLICIES[policy]
    assert cls.config_type is POLICY_CONFIGS[policy]
    declared = {o.name: o.default for o in options_of(cls.config_type).values()}
    # (A compiled class shows ``*args, **kwargs`` here: this holds the source, which test_compiled mirrors.)
    assert not set(inspect.signature(cls.__init__).parameters) & set(declared)  # no option of its own
    built = make_policy(policy, load_profile().cost_model(), tpot_slo=0.1)
    assert built.name == policy
    assert {k: getattr(built.config, k) for k in declared} == {**declared, **built_tpot(policy)}


def built_tpot(policy: str) -> dict:
    """The run's TPOT SLO fills the option of that name where a policy declares one (Sarathi's)."""
    return {"tpot_slo": 0.1} if "tpot_slo" in options_of(POLICY_CONFIGS[policy]) else {}


def test_the_cli_lists_each_option_with_its_declared_default_and_range():
    def options(*args: str, columns: str = "200") -> str:
        env = {**os.environ, "COLUMNS": columns}
        cmd = [sys.executable, "-m", "fairbatching", "options", *args]
        return subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=True, env=env).stdout

    listed = {policy: {o["option"]: o for o in rows} for policy, rows in json.loads(options("--json")).items()}
    assert list(listed) == list(POLICY_CONFIGS)
    for name, opt in OPTIONS:
        row = listed[name].pop(opt.name)
        assert row == {"option": opt.name, "default": opt.default, "range": opt.describe(), "help": opt.help}
    narrow = options(columns="80")
    assert max(map(len, narrow.splitlines())) <= 80
    assert all(f" {opt.name} " in narrow for _, opt in OPTIONS)  # every name a user types, whole
    assert not any(listed.values())  # nothing listed that is not declared
