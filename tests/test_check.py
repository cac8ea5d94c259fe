"""``mta check`` text lines that need no network."""

from __future__ import annotations

from mta.check import _probe_line


def test_a_plaintext_probe_says_so() -> None:
    """Level "may" to a server without STARTTLS: not "None None NO forward secrecy"."""
    probe = {
        "address": "127.0.0.7",
        "result": "ok",
        "protocol": None,
        "cipher": None,
        "forward_secret": False,
        "certificate": None,
        "chain_length": 0,
        "verification": None,
    }
    line = _probe_line(probe)
    assert line.splitlines()[0] == "  connect     127.0.0.7: plaintext (no STARTTLS offered)"
    assert "None" not in line
