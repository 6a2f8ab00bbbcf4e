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


# The commands the README documents, and options that each one's help must show (a stub would lack them).
EXPECTED = {
    "run": ["--output", "--model", "--top-k", "--method", "--resume", "--overwrite", "--box-column", "--ray"],
    "audit": ["--output", "--classes", "--method", "--overlays", "--class-names"],
    "layers": ["--model", "--weights", "--input-size", "--all"],
    "bench": ["--model", "--batch-size", "--baselines", "--methods", "--json"],
    "demo": ["--output", "--audit", "--overlays", "--metrics"],
}


def test_the_cli_has_every_documented_command():
    assert {p[0] for p, _ in COMMANDS if len(p) == 1} >= set(EXPECTED)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_help_names_and_explains_every_option(name):
    cmd = cli.commands[name]
    text = CliRunner().invoke(cli, [name, "--help"], catch_exceptions=False).output
    words = set(text.replace(",", " ").replace("/", " ").replace("=", " ").split())
    options = [p for p in cmd.params if isinstance(p, click.Option) and not p.hidden]
    named = {o for p in options for o in p.opts + p.secondary_opts}
    missing = [o for o in EXPECTED[name] if o not in named]
    assert not missing, f"{name} lacks the options {missing}"
    for p in options:
        for o in p.opts + p.secondary_opts:
            assert o in words, f"`{name} --help` does not show {o}"
        assert (p.help or "").strip(), f"{name} {p.opts[-1]} has no help text"


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
