"""Property-based tests of the config loader: any misspelt key or wrongly typed value anywhere in the shipped
config is rejected before work, with a message naming that key."""

from __future__ import annotations

import copy
import re
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tokenbridge.config import ConfigError, read_yaml
from tokenbridge.train import check_run_config

SHIPPED = read_yaml(Path(__file__).resolve().parents[1] / "configs" / "fmnist.yaml")


def _leaves(node: dict, prefix: tuple = ()) -> list[tuple]:
    """Paths of every leaf key of the shipped config (expanded: every key the run config knows, defaults included)."""
    out = []
    for key, value in node.items():
        if isinstance(value, dict) and value:
            out += _leaves(value, prefix + (key,))
        else:
            out.append(prefix + (key,))
    return out


RESOLVED = check_run_config(SHIPPED).model_dump(mode="json")
# the resolved model/sample sections hold every constructor / sample() argument: mutate those, in the raw layout
PATHS = [p for p in _leaves(RESOLVED) if p[0] != "model" or p[1] in ("backbone", "head", "quantizer")]


def _set(config: dict, path: tuple, value) -> None:
    node = config
    for key in path[:-1]:
        node = node.setdefault(key, {})
    node[path[-1]] = value


@settings(max_examples=60, deadline=None)
@given(path=st.sampled_from(PATHS), suffix=st.text(alphabet="abcxyz_", min_size=1, max_size=3))
def test_a_misspelt_key_is_named(path, suffix):
    config = copy.deepcopy(SHIPPED)
    _set(config, path[:-1] + (path[-1] + suffix,), 1)
    with pytest.raises(ConfigError, match=re.escape(f"unknown config key '{'.'.join(path[:-1] + (path[-1] + suffix,))}'")):
        check_run_config(config)


@settings(max_examples=60, deadline=None)
@given(path=st.sampled_from(PATHS), bad=st.sampled_from([{"nested": 1}, [[1, 2], 3]]))
def test_a_value_of_the_wrong_type_is_named(path, bad):
    config = copy.deepcopy(SHIPPED)
    _set(config, path, bad)
    with pytest.raises(ConfigError, match=re.escape(f"'{'.'.join(path)}")):
        check_run_config(config)
