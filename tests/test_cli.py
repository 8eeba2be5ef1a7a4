"""The command line: help with examples, clear one-line errors and exit codes."""

from __future__ import annotations

import subprocess
import sys

import pytest

from weightlens.cli import build_parser, main


def test_help_lists_commands_and_examples(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    for word in ("zoo", "tour", "weightlens zoo build --size ci"):
        assert word in out


def test_unknown_zoo_is_a_one_line_error_with_exit_code_1(capsys):
    assert main(["zoo", "build", "--names", "nope"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("weightlens: error: Unknown zoo 'nope'") and "digits-tasks" in err
    assert "\n" not in err


def test_zoo_list_reports_built_state(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("WEIGHTLENS_HOME", str(tmp_path))
    assert main(["zoo", "list"]) == 0
    out = capsys.readouterr().out
    assert "digits-tasks" in out and "not built" in out and str(tmp_path) in out


def test_console_script_runs():
    done = subprocess.run([sys.executable, "-m", "weightlens.cli", "zoo", "--help"], capture_output=True, text=True)
    assert done.returncode == 0 and "build" in done.stdout


def test_parser_choices_are_the_zoo_sizes():
    from weightlens.zoo import SIZES

    build = build_parser()._subparsers._group_actions[0].choices["zoo"]
    sizes = build._subparsers._group_actions[0].choices["build"]._option_string_actions["--size"].choices
    assert tuple(sizes) == SIZES
