"""Settings from one source (moekd/options.py): flags generated from the options dataclasses, and
--config files loaded into the same dataclasses with the command line winning."""

import dataclasses

import pytest
import typer
from typer.testing import CliRunner

from moekd.cache_builder.options import BuildOptions
from moekd.cli import app
from moekd.data.options import SynthOptions
from moekd.distill.options import TrainOptions
from moekd.errors import MoekdError
from moekd.eval.options import EvalOptions
from moekd.families import FamiliesOptions
from moekd.options import Part, command, flags_of, option
from moekd.routing.stats import StatsOptions
from moekd.sar.options import SarOptions
from moekd.store.options import FinalizeOptions, InfoOptions, PackOptions, PullOptions, PushOptions, VerifyOptions

COMMANDS = [
    (("train",), TrainOptions),
    (("sar", "train"), SarOptions),
    (("cache", "build"), BuildOptions),
    (("eval",), EvalOptions),
    (("routing", "stats"), StatsOptions),
    (("routing", "families"), FamiliesOptions),
    (("data", "synth"), SynthOptions),
    (("cache", "info"), InfoOptions),
    (("cache", "verify"), VerifyOptions),
    (("cache", "finalize"), FinalizeOptions),
    (("cache", "push"), PushOptions),
    (("cache", "pull"), PullOptions),
    (("cache", "pack"), PackOptions),
]


def click_command(path):
    command_ = typer.main.get_command(app)
    for name in path:
        command_ = command_.commands[name]
    return command_


@pytest.mark.parametrize("path, cls", COMMANDS, ids=lambda x: " ".join(x) if isinstance(x, tuple) else x.__name__)
def test_every_flag_has_its_dataclass_default_and_nothing_else(path, cls):
    params = {p.name: p for p in click_command(path).params}
    defaults = {f.name: f.default for f in dataclasses.fields(cls)}
    generated = flags_of(cls)
    assert set(params) == {f.name for f in generated} | {"config"}  # no flag written by hand beside them
    for f in generated:
        param = params[f.name]
        assert "/".join(param.opts + param.secondary_opts) == f.flag and getattr(param, "help", f.help) == f.help
        if f.part is None and f.parse is None and not f.required:
            assert param.default == defaults[f.name], f.name  # a default restated by hand would differ here


@dataclasses.dataclass
class Toy:
    name: str = option(help="A required name.")
    steps: int = option(3, "Steps.")
    rate: float = option(0.5, "Rate.")
    fast: bool = option(False, "Go fast.")
    mode: str = option("a", "Mode.", flag="--kind")
    extras: dict = option(default_factory=dict, help="-", parts=(Part("colour", "colour", str, "Colour."),))


def toy_app():
    toy = typer.Typer()
    seen = []

    @command(toy, "run", Toy)
    def run(options: Toy) -> None:
        """Run the toy."""
        seen.append(options)

    @toy.command("other")
    def other() -> None:  # a second command keeps `run` a subcommand
        pass

    return toy, seen


def invoke(tmp_path, config: str | None, *args):
    toy, seen = toy_app()
    argv = ["run", *args]
    if config is not None:
        (tmp_path / "c.yaml").write_text(config)
        argv += ["--config", str(tmp_path / "c.yaml")]
    result = CliRunner().invoke(toy, argv)
    return result, seen


def test_a_config_file_fills_the_options_and_flags_given_win(tmp_path):
    result, seen = invoke(tmp_path, "name: a\nsteps: 7\nrate: 2\nfast: true\ncolour: red\n", "--steps", "9")
    assert result.exit_code == 0, result.output
    assert seen == [Toy(name="a", steps=9, rate=2.0, fast=True, extras={"colour": "red"})]
    result, seen = invoke(tmp_path, "name: b\nextras: {colour: blue}\n")  # a dict option given whole
    assert seen == [Toy(name="b", extras={"colour": "blue"})]
    result, seen = invoke(tmp_path, None, "--name", "c", "--fast")
    assert seen == [Toy(name="c", fast=True, extras={"colour": None})]


def test_a_config_key_may_be_the_flag_name(tmp_path):
    result, seen = invoke(tmp_path, "name: a\nkind: b\n")
    assert seen == [Toy(name="a", mode="b", extras={"colour": None})], result.output
    result, seen = invoke(tmp_path, "name: a\nmode: c\n")
    assert seen[0].mode == "c"


def test_option_names_may_use_dashes_and_toml_works(tmp_path):
    (tmp_path / "c.toml").write_text('name = "t"\nsteps = 4\n')
    toy, seen = toy_app()
    result = CliRunner().invoke(toy, ["run", "--config", str(tmp_path / "c.toml")])
    assert result.exit_code == 0 and seen == [Toy(name="t", steps=4, extras={"colour": None})]
    result, seen = invoke(tmp_path, "name: d\nsteps: 5\n")
    assert seen[0].steps == 5


@pytest.mark.parametrize(
    "config, message",
    [
        ("name: a\nstep: 3\n", "unknown setting 'step'"),
        ("name: a\nsteps: many\n", "steps must be int, got 'many'"),
        ("name: a\nsteps: true\n", "steps must be int, got True"),
        ("name: a\nfast: 1\n", "fast must be bool, got 1"),
        ("name: a\nextras: {size: 2}\n", "extras has unknown entries ['size']"),
        ("steps: 2\n", "--name is required: pass it, or set name in --config"),
        ("- 1\n", "expected a mapping"),
        ("name: [\n", "not valid YAML"),
    ],
)
def test_config_mistakes_name_the_setting(tmp_path, config, message):
    result, seen = invoke(tmp_path, config)
    assert isinstance(result.exception, MoekdError) and message in str(result.exception), result.output
    assert not seen
