"""README "Beside Postfix", word for word: a private Postfix and mta, both directions.

The three blocks (main.cf, master.cf, the mta policy) are read from README.md. The
test adds only what a site has already and this machine needs instead of the
internet, each named here:
- Postfix: its private directories (``postfix.instance_main_cf``), its certificate,
  ``mynetworks``, and a mailbox for bob@example.com (virtual(8) to a Maildir);
- mta: the MX address 192.0.2.25 becomes 127.0.0.25, user "mta" becomes "nobody",
  and a ``[[route]]`` sends every other domain to a TLS sink (the world's MX hosts).
Every hop's TLS is checked in the ``Received:`` fields.
"""

from __future__ import annotations

import os
import re
import shutil
import smtplib
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import trustme

from tests.integration import postfix
from tests.integration.receivers import Receiver
from tests.integration.relayproc import RelayProcess, client_tls, wait_until

RECEIVED = rb"^Received:[^\n]*(?:\n[ \t][^\n]*)*"  # a field with its folded lines
TLS_COMMENT = re.compile(rb"\(using TLSv1\.[23] with cipher [A-Z0-9_-]+ \(\d+/\d+ bits\)")


def readme_block(name: str) -> str:
    return postfix.readme_block("beside-postfix", name)


def substitute(text: str, changes: dict[str, str]) -> str:
    for old, new in changes.items():
        assert text.count(old) == 1, f"README block changed: {old!r}"
        text = text.replace(old, new)
    return text


@pytest.fixture
def base() -> Iterator[Path]:
    """A directory that nobody (mta's user here) may enter."""
    path = Path(tempfile.mkdtemp(prefix="mta-postfix-"))
    path.chmod(0o711)
    yield path
    shutil.rmtree(path)


@pytest.fixture
def postfix_instance(base: Path, tls_ca: trustme.CA) -> Iterator[Path]:
    """Postfix configured by the README blocks; yields its mail directory."""
    dirs = postfix.PostfixDirs(base / "postfix")
    mail = dirs.base / "mail"
    mail.mkdir(parents=True)
    os.chown(mail, 65534, 65534)
    cert = tls_ca.issue_cert("mail.example.com")
    cert.private_key_and_cert_chain_pem.write_to_path(str(base / "postfix-chain.pem"))
    site = f"""\
mydestination =
local_recipient_maps =
alias_maps =
alias_database =
mynetworks = 127.0.0.0/8
smtpd_tls_chain_files = {base / "postfix-chain.pem"}
virtual_mailbox_domains = example.com
virtual_mailbox_base = {mail}
virtual_mailbox_maps = inline:{{ bob@example.com=bob/ }}
virtual_uid_maps = static:65534
virtual_gid_maps = static:65534
"""
    main_cf = postfix.instance_main_cf(dirs.base, "mail.example.com") + site
    postfix.write_config(
        dirs, main_cf + readme_block("main.cf"), postfix.master_cf(readme_block("master.cf"))
    )
    with postfix.running(dirs):
        yield mail


def test_postfix_and_mta_both_directions(
    base: Path, postfix_instance: Path, tls_ca: trustme.CA
) -> None:
    with Receiver("127.0.0.2", tls="fs", ca=tls_ca) as world:
        policy = substitute(
            readme_block("relay.toml"),
            {'"192.0.2.25"': '"127.0.0.25"', 'user = "mta"': 'user = "nobody"'},
        )
        policy += f'\n[[route]]\ndomain = "*"\nnexthop = "[127.0.0.2]:{world.port}"\n'
        relay = RelayProcess(base, "", server="")
        relay.policy_file.write_text(policy)
        try:
            relay.start()
            # Outbound: a user's client -> Postfix -> mta -> the world, TLS each hop.
            with smtplib.SMTP("127.0.0.1", 10026, local_hostname="client.test") as smtp:
                smtp.starttls(context=client_tls())
                smtp.sendmail(
                    "alice@example.com",
                    ["carol@remote.test"],
                    "From: alice@example.com\r\nTo: carol@remote.test\r\n\r\nout\r\n",
                )
            (got,) = world.wait_for(1, timeout=60)
            assert got.tls_version in ("TLSv1.2", "TLSv1.3")
            headers = got.content.split(b"\r\n\r\n", 1)[0]
            received = re.findall(RECEIVED, headers, re.M)
            assert len(received) == 2, headers
            ours, postfixs = received  # the newest first
            assert b"by mail.example.com (Postfix)" in postfixs
            assert TLS_COMMENT.search(postfixs), postfixs
            assert b"mail.example.com" in ours, ours
            assert TLS_COMMENT.search(ours), ours

            # Inbound: the world -> mta (the MX) -> Postfix -> bob's Maildir.
            with smtplib.SMTP("127.0.0.25", 25, local_hostname="world.test") as smtp:
                smtp.starttls(context=client_tls())
                smtp.sendmail(
                    "dave@remote.test",
                    ["bob@example.com"],
                    "From: dave@remote.test\r\nTo: bob@example.com\r\nSubject: in\r\n\r\nin\r\n",
                )
            new = postfix_instance / "bob" / "new"
            wait_until(lambda: new.is_dir() and any(new.iterdir()), 60, "bob's mailbox")
            (delivered,) = new.iterdir()
            content = delivered.read_bytes()
            received = re.findall(RECEIVED, content, re.M)
            assert len(received) == 2, content
            postfixs, ours = received
            assert b"by mail.example.com (Postfix)" in postfixs
            assert TLS_COMMENT.search(postfixs), postfixs
            assert b"from world.test" in ours, ours
            assert TLS_COMMENT.search(ours), ours
        finally:
            relay.stop()
        assert "status=deferred" not in (base / "postfix" / "maillog").read_text()
