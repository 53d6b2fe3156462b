"""The example config files under examples/ hold only settings their command knows, with valid values."""

from __future__ import annotations

import pytest

from moekd.cache_builder.options import BuildOptions
from moekd.distill.options import TrainOptions
from moekd.errors import MoekdError
from moekd.options import flags_of, load_config
from tests.test_bad_inputs import ROOT

EXAMPLES = ROOT / "examples"
COMMAND_OF = {"qwen3-moe-cache.yaml": BuildOptions, "qwen3-moe-to-dense.yaml": TrainOptions}


def test_every_example_is_checked():
    assert sorted(p.name for p in EXAMPLES.glob("*.yaml")) == sorted(COMMAND_OF)


@pytest.mark.parametrize("name", sorted(COMMAND_OF))
def test_example_config_loads_through_its_command_options(name):
    values = load_config(EXAMPLES / name, flags_of(COMMAND_OF[name]))
    assert values and all(value is not None for value in values.values())


def test_a_misspelt_key_fails(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text((EXAMPLES / "qwen3-moe-to-dense.yaml").read_text().replace("batch-tokens:", "batch-token:"))
    with pytest.raises(MoekdError, match="unknown setting 'batch-token'"):
        load_config(bad, flags_of(TrainOptions))
