"""The command line, in-process: exit codes and one-line errors (no sockets)."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from mta import cli

ROOT = Path(__file__).parent.parent


def test_policy_validate_accepts_the_shipped_policies(capsys: pytest.CaptureFixture[str]) -> None:
    files = sorted(str(p) for p in (ROOT / "policies").glob("*.toml"))
    assert len(files) >= 2
    assert cli.main(["policy", "validate", *files]) == cli.EXIT_OK
    assert capsys.readouterr().out.count(": ok") == len(files)


def test_policy_validate_reports_each_bad_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    good, bad = tmp_path / "good.toml", tmp_path / "bad.toml"
    good.write_text("[outbound]\nport = 2525\n")
    bad.write_text('[relay]\nlocal_domains = ["ok.test"]\nnetworks = "10.0.0.0/8"\n')
    assert cli.main(["policy", "validate", str(good), str(bad)]) == cli.EXIT_CONFIG
    err = capsys.readouterr().err.strip()
    assert err == f"mta: {bad}: relay.networks: expected a list, got '10.0.0.0/8'"


def test_missing_policy_file_is_a_config_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main(["queue", "list", "--config", str(tmp_path / "nope.toml")]) == cli.EXIT_CONFIG
    assert "nope.toml: (file): cannot read" in capsys.readouterr().err


def test_unknown_command_is_a_usage_error() -> None:
    with pytest.raises(SystemExit) as caught:
        cli.main(["frobnicate"])
    assert caught.value.code == 2


def _command_paths(parser: argparse.ArgumentParser, prefix: str = "") -> list[tuple[str, str]]:
    """(``queue hold``, its help line) for every command and sub-command the CLI has;
    a positional ``action`` with choices (``keys``) counts each choice as a command."""
    found: list[tuple[str, str]] = []
    for action in parser._actions:  # argparse keeps sub-parsers only here
        if isinstance(action, argparse._SubParsersAction):
            helps = {choice.dest: choice.help or "" for choice in action._choices_actions}
            for name, child in action.choices.items():
                path = f"{prefix}{name}"
                nested = _command_paths(child, path + " ")
                found.extend(nested or [(path, helps.get(name, ""))])
        elif action.dest == "action" and action.choices and prefix:
            found.extend((f"{prefix}{choice}", "(choice)") for choice in action.choices)
    return found


def test_every_command_has_a_help_line_and_a_row_in_the_readme_operator_table() -> None:
    readme = (ROOT / "README.md").read_text()
    table = readme.split("## Operator commands", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in table.splitlines() if line.startswith("| `mta ")]
    paths = _command_paths(cli.build_parser())
    assert len(paths) >= 20, paths
    for path, help_line in paths:
        assert help_line.strip(), f"mta {path}: no help line in mta --help"
        assert any(row.startswith(f"| `mta {path}") for row in rows), f"mta {path}: no README row"
