import click
import pytest
from click.testing import CliRunner

from probe.cli import main


def _commands(group: click.Group, prefix=()):
    for name, command in group.commands.items():
        yield (*prefix, name), command
        if isinstance(command, click.Group):
            yield from _commands(command, (*prefix, name))


@pytest.mark.parametrize("path, command", list(_commands(main)), ids=lambda v: " ".join(v)
                         if isinstance(v, tuple) else "")
def test_every_help_explains_every_option(path, command):
    result = CliRunner().invoke(main, [*path, "--help"])
    assert result.exit_code == 0, result.output
    for param in command.params:
        if isinstance(param, click.Option) and param.name != "help":
            assert param.help, f"{' '.join(path)} {param.opts[0]} has no help text"
            has_default = param.default is not None and not param.is_flag and param.default != ()
            if has_default:
                assert "default" in result.output


def test_synth_then_check_from_the_command_line(tmp_path):
    runner = CliRunner()
    result = runner.invoke(main, ["data", "synth", "--out", str(tmp_path / "b"), "--classes", "3",
                                  "--per-class", "4", "--size", "48"])
    assert result.exit_code == 0, result.output
    result = runner.invoke(main, ["data", "check", str(tmp_path / "b")])
    assert result.exit_code == 0 and "classes          3" in result.output, result.output


def test_user_errors_are_one_line_not_a_traceback(tmp_path):
    result = CliRunner().invoke(main, ["dump", "--backbone", "vit_bb", "--data", str(tmp_path)])
    assert result.exit_code == 2
    assert result.output.startswith("error: unknown backbone 'vit_bb'. Did you mean: vit_b")
    assert "Traceback" not in result.output
