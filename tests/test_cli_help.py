"""Every command of the ``gradcam-batch`` CLI, at any depth, has help text and a working --help.

The commands are collected from the click group at run time, so commands added later are
covered without touching this file.
"""

from __future__ import annotations

import click
import pytest
from click.testing import CliRunner

from gradcam_batch import __version__
from gradcam_batch.cli import cli


def _walk(group: click.Group, path: tuple[str, ...] = ()) -> list[tuple[tuple[str, ...], click.Command]]:
    found = [(path, group)]
    ctx = click.Context(group, info_name="gradcam-batch")
    for name in group.list_commands(ctx):
        cmd = group.get_command(ctx, name)
        assert cmd is not None, f"{' '.join(path + (name,))} is listed but cannot be loaded"
        if isinstance(cmd, click.Group):
            found += _walk(cmd, path + (name,))
        else:
            found.append((path + (name,), cmd))
    return found


COMMANDS = _walk(cli)


def test_the_cli_has_commands():
    assert len(COMMANDS) >= 2, "the group has no subcommands"


@pytest.mark.parametrize(("path", "cmd"), COMMANDS, ids=[" ".join(p) or "gradcam-batch" for p, _ in COMMANDS])
def test_command_help(path, cmd):
    text = (cmd.help or cmd.short_help or "").strip()
    assert text, f"{' '.join(path) or 'the group'} has no help text"
    result = CliRunner().invoke(cli, [*path, "--help"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert "Usage:" in result.output
    # click re-wraps the text: compare the opening words, whitespace-insensitive.
    opening = " ".join(text.split()[:4])
    assert opening in " ".join(result.output.split())


def test_version():
    result = CliRunner().invoke(cli, ["--version"], catch_exceptions=False)
    assert result.exit_code == 0
    assert __version__ in result.output


def test_unknown_command_is_a_usage_error():
    result = CliRunner().invoke(cli, ["no-such-command"])
    assert result.exit_code == 2
    assert "No such command" in result.output
