"""The command line, in-process: exit codes and one-line errors (no sockets)."""

from __future__ import annotations

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
