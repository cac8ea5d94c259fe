"""Fixtures of the inbound tests: an in-process listener (``inbound.Relay``) with a
certificate from the run's CA, AUTH users, and a client context that trusts that CA."""

from __future__ import annotations

import ssl
from collections.abc import Iterator
from pathlib import Path

import pytest
import trustme

from mta.receive.auth import PasswordFile
from tests.integration.inbound import Recorder, Relay, listener_context, make_config, password_file


@pytest.fixture(scope="module")
def server_tls(tls_ca: trustme.CA, tmp_path_factory: pytest.TempPathFactory) -> ssl.SSLContext:
    return listener_context(tls_ca, tmp_path_factory.mktemp("server-tls"))


@pytest.fixture
def client_context(ca_file: Path) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(ca_file))


@pytest.fixture(scope="module")
def passwords(tmp_path_factory: pytest.TempPathFactory) -> PasswordFile:
    return password_file(tmp_path_factory.mktemp("auth"))


@pytest.fixture
def recorder() -> Recorder:
    return Recorder()


@pytest.fixture
def limits() -> str:
    """The ``[limits]`` lines of the relay under test (a test overrides it by parametrize)."""
    return ""


@pytest.fixture
def relay(
    tmp_path: Path,
    recorder: Recorder,
    server_tls: ssl.SSLContext,
    passwords: PasswordFile,
    limits: str,
) -> Iterator[Relay]:
    config = make_config(tmp_path, limits=limits)
    with Relay(config, recorder, server_tls, passwords.authenticator) as running:
        yield running
