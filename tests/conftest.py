"""Shared fixtures. Outside tests/integration/ no test may open a network connection."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
import trustme

INTEGRATION = Path(__file__).parent / "integration"


@pytest.fixture(autouse=True)
def _no_network_outside_integration(
    request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Unit tests are pure: connecting a socket is a bug there (STYLE.md C.10)."""
    if Path(str(request.node.path)).is_relative_to(INTEGRATION):
        return

    def refuse(*_args: object, **_kwargs: object) -> None:
        raise RuntimeError("unit tests must not open network connections")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


@pytest.fixture(scope="session")
def tls_ca() -> trustme.CA:
    """A throw-away certificate authority for every TLS test of the run."""
    return trustme.CA()


@pytest.fixture(scope="session")
def ca_file(tls_ca: trustme.CA, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("ca") / "ca.pem"
    tls_ca.cert_pem.write_to_path(str(path))
    return path
