"""Coverage-guided fuzzing of the parsers of outside input with atheris (libFuzzer).

Not part of the test suite (pytest does not collect this file, and atheris is not a
dependency): the hypothesis tests (``tests/**/test_fuzz_*.py``) hold every case this
found, as explicit examples. Run a target for a while when a parser changes:

    .venv/bin/pip install atheris
    .venv/bin/python tests/atheris_fuzz.py config -max_total_time=300

Targets: ``config`` (policy file text), ``address`` (MAIL/RCPT paths), ``sts`` (MTA-STS
TXT record and policy), ``dsn`` (the DSN builder, on hostile original headers),
``passwd`` (a password file line). A target fails on any exception that is not the
parser's own error, and on a broken property (an error message of more than one line,
a DSN line that is not CRLF-terminated or longer than 998 octets).
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable
from pathlib import Path

import atheris

with atheris.instrument_imports():
    from mta import config
    from mta.errors import ConfigError
    from mta.model import Envelope
    from mta.policy.mta_sts import StsError, parse_policy, parse_txt
    from mta.receive.addresses import AddressError, parse_path, path_argument
    from mta.receive.auth import parse_line
    from mta.reply import SmtpReply
    from mta.report.dsn import FailedRecipient, build_dsn, header_block


def fuzz_config(data: bytes) -> None:
    try:
        config.parse_text(data.decode("utf-8", "replace"), "fuzz.toml", Path("/data"))
    except ConfigError as err:
        if "\n" in str(err):
            raise AssertionError(f"a two-line error: {str(err)!r}") from None


def fuzz_address(data: bytes) -> None:
    text = data.decode("utf-8", "replace")
    try:
        path = parse_path(text, allow_null=True)
    except AddressError:
        pass
    else:
        if not path.is_null:
            again = parse_path(f"<{path.address}>")
            if (again.local_part, again.domain) != (path.local_part, path.domain):
                raise AssertionError(f"{text!r} does not parse back to itself")
    with contextlib.suppress(AddressError):
        path_argument(text, "TO:")


def fuzz_sts(data: bytes) -> None:
    text = data.decode("utf-8", "replace")
    with contextlib.suppress(StsError):
        parse_policy(text)
    with contextlib.suppress(StsError):
        parse_txt([text])


def fuzz_dsn(data: bytes) -> None:
    fdp = atheris.FuzzedDataProvider(data)
    rcpt = fdp.ConsumeUnicodeNoSurrogates(40) or "x"
    text = fdp.ConsumeUnicodeNoSurrogates(200)
    headers = fdp.ConsumeBytes(2000)
    dsn = build_dsn(
        original=Envelope("a@b.test", (rcpt,), 0.0),
        original_headers=header_block(headers),
        failed=[FailedRecipient(rcpt, "5.1.1", SmtpReply(550, "5.1.1", text), text[:50] or None)],
        reporting_mta="mx.test",
        now=1e9,
        message_id="<dsn@mx.test>",
    )
    if b"\n" in dsn.replace(b"\r\n", b"") or b"\r" in dsn.replace(b"\r\n", b""):
        raise AssertionError("a bare CR or LF in the DSN")
    if max(len(line) for line in dsn.split(b"\r\n")) > 998:
        raise AssertionError("a DSN line over 998 octets")


def fuzz_passwd(data: bytes) -> None:
    with contextlib.suppress(ValueError):
        parse_line(data.decode("utf-8", "replace"))


TARGETS: dict[str, Callable[[bytes], None]] = {
    "config": fuzz_config,
    "address": fuzz_address,
    "sts": fuzz_sts,
    "dsn": fuzz_dsn,
    "passwd": fuzz_passwd,
}

if __name__ == "__main__":
    if len(sys.argv) < 2 or sys.argv[1] not in TARGETS:
        sys.exit(f"usage: {sys.argv[0]} {{{','.join(TARGETS)}}} [libFuzzer options]")
    target = TARGETS[sys.argv.pop(1)]
    atheris.Setup(sys.argv, target)
    atheris.Fuzz()
