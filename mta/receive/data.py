"""The DATA stream (RFC 5321 §4.1.1.4, §4.5.2): find its end, undo dot-stuffing, check limits.

Pure: no I/O. aiosmtpd reads DATA one line at a time, a Python loop iteration per line;
for a 1 MiB message that is some 13,000 of them. ``DataStream`` takes whole chunks
instead and does the same with bytes methods, with aiosmtpd's rules exactly: the data
ends only at ``CRLF . CRLF`` (a bare LF never ends it: the smuggling defence needs the
whole stream, bare endings included, which the handler then refuses), a line starting
with a dot loses that dot, a line longer than ``line_limit`` octets (with its CRLF and
any transparency dot) makes the message too long, more than ``size_limit`` octets too
big. Past a limit the data is still read to its end, but no longer kept.

``refusal`` then judges the message itself, with bytes methods and regular expressions
over the header section only (never a Python step per line or byte of the body):

- a NUL anywhere (``550 5.6.0``): a next hop that drops NULs would read
  ``<CR><LF><NUL>.<CR><LF>`` as the end of the data and run what follows as commands
  (smtpsmug's ``nullbefore``);
- a header section over ``header_section_size`` octets, or one header field (its folded
  lines together) over ``header_size`` (Postfix's ``header_size_limit``): ``552 5.3.4``;
- ``hop_count`` or more ``Received:`` and ``Delivered-To:`` fields, counting the one we
  add (Postfix's ``hopcount_limit``): ``554 5.4.6``, a mail loop.

The header section ends at the first line that is neither a field (``name:``) nor the
continuation of one: the empty line, or a body that starts without one (as Postfix's
cleanup reads it).
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass, field
from typing import Final

from mta.crlf import CRLF

END: Final = b"\r\n.\r\n"
_CRLF: Final = CRLF
_NOT_A_FIELD: Final = rb"(?![ \t]|[!-9;-~]+[ \t]*:)"  # neither a continuation nor "name:"
_FIRST_NOT_A_FIELD: Final = re.compile(rb"(?![!-9;-~]+[ \t]*:)")
_SECTION_END: Final = re.compile(rb"\r\n" + _NOT_A_FIELD)
_FIELD_START: Final = re.compile(rb"\r\n(?![ \t])")
_HOP: Final = re.compile(rb"\n(?:received|delivered-to)[ \t]*:")  # in a lower-cased copy


class Refusal(enum.Enum):
    """Why a whole message is refused at the end of DATA (see ``refusal``)."""

    NUL = "nul-character"
    HEADER_TOO_BIG = "header-too-big"
    TOO_MANY_HOPS = "too-many-hops"


def header_section_end(body: bytes | bytearray) -> int:
    """Octets of ``body`` before its first line that is not a header field or its
    continuation (the CRLF ending the last field included)."""
    if _FIRST_NOT_A_FIELD.match(body):
        return 0
    end = _SECTION_END.search(body)
    return len(body) if end is None else end.start() + len(_CRLF)


def refusal(
    body: bytes | bytearray, *, header_size: int, header_section_size: int, hop_count: int
) -> Refusal | None:
    """Why ``body`` (the message as the client meant it) must be refused; None if not.

    Parameters:
        header_size: most octets in one header field, its folded lines together.
        header_section_size: most octets in the header section.
        hop_count: the ``Received:``/``Delivered-To:`` count that is refused, the
            ``Received:`` we add counted (Postfix: ``++hops >= hopcount_limit``).
    """
    if b"\0" in body:
        return Refusal.NUL
    end = header_section_end(body)
    if end > header_section_size:
        return Refusal.HEADER_TOO_BIG
    section = body[:end]
    if end > header_size and max(map(len, _FIELD_START.split(section))) > header_size:
        return Refusal.HEADER_TOO_BIG
    if len(_HOP.findall(b"\n" + section.lower())) + 1 >= hop_count:
        return Refusal.TOO_MANY_HOPS
    return None


def has_long_line(data: bytes | bytearray, limit: int) -> bool:
    """Whether a CRLF-separated line of ``data`` is longer than ``limit`` octets, its CRLF
    included, as aiosmtpd counts it.

    Jumps from line start to line start by the last CRLF within ``limit`` octets: about
    one ``rfind`` per ``limit`` octets, not one step per line (splitting a 1 MiB message
    into its 13,000 lines cost ten times more; a regex such as ``[^\n]{1001,}`` would
    backtrack through every line).
    """
    longest = limit - len(_CRLF)  # octets before the CRLF
    start = 0
    while len(data) - start > longest:
        crlf = data.rfind(_CRLF, start, start + longest + len(_CRLF))
        if crlf < 0:  # no CRLF begins within ``longest`` octets of this line's start
            return True
        start = crlf + len(_CRLF)
    return False


@dataclass
class DataStream:
    """Feed chunks with ``feed`` until it returns True; then read the outcome.

    Parameters:
        size_limit: most octets of data accepted (0: no limit).
        line_limit: most octets in one line, its CRLF included (aiosmtpd: 1001).
    """

    size_limit: int
    line_limit: int = 1001
    too_big: bool = False
    too_long: bool = False
    leftover: bytes = b""  # what followed the end: pipelined commands
    dot_free: bool = False  # no line of the content begins with "." (known at the end)
    # The stream as read, from the DATA line's CRLF on: the chunks themselves, joined
    # once at the end (appending each to one growing buffer cost a reallocation, often
    # a copy of all so far, every few chunks: 8% of a receiving process's time).
    _chunks: list[bytes] = field(default_factory=lambda: [_CRLF])
    _size: int = len(_CRLF)  # octets in _chunks
    _tail: bytes = _CRLF  # the last len(END) - 1 octets read: an end may span two chunks
    _dropped: int = 0  # octets seen but no longer kept (past a limit)
    _body: bytearray = field(default_factory=bytearray)

    def feed(self, chunk: bytes) -> bool:
        """Take the next bytes of the stream; True once the end of the data is in."""
        keep = len(END) - 1
        at = (self._tail + chunk[:keep]).find(END)  # an end that starts in the tail
        into = at + len(END) - len(self._tail)  # octets of ``chunk`` up to the end's end
        if at < 0:
            at = chunk.find(END)
            into = at + len(END)
        if at < 0:
            self._chunks.append(chunk)
            self._size += len(chunk)
            self._tail = chunk[-keep:] if len(chunk) >= keep else (self._tail + chunk)[-keep:]
            self._bound()
            return False
        self.leftover = chunk[into:]
        stuffed = bytearray()
        if not self.too_big:
            stuffed = stuffed.join((*self._chunks, chunk))  # the one copy
            del stuffed[self._size + into - (len(END) - len(_CRLF)) :]  # in place
        self._chunks = []
        self._finish(stuffed)
        return True

    def _bound(self) -> None:
        """Past the size limit, keep only the tail that may still hold the end.

        (Line lengths are judged at the end: what is kept until then is bounded by the
        size limit anyway.)"""
        size = self._dropped + self._size - len(_CRLF)
        if self.size_limit and size > self.size_limit:
            self.too_big = True
        if self.too_big:
            self._dropped += self._size
            self._chunks.clear()
            self._size = 0

    def _finish(self, stuffed: bytearray) -> None:
        """``stuffed``: the leading CRLF, the lines as sent, the last line's CRLF."""
        if self.too_big or self.too_long:
            return
        if self.size_limit and len(stuffed) - len(_CRLF) > self.size_limit:
            self.too_big = True
            return
        if has_long_line(stuffed, self.line_limit):
            self.too_long = True
            return
        # No copy (one where a line was dot-stuffed): the message stays in the buffer it
        # arrived in, and the handler copies it once, into the content it stores with its
        # ``Received:`` field in front. (Deleting from the front of a ``bytearray`` only
        # moves its start.) At 1 MiB per message and 20 sessions each copy is 20 MB.
        if stuffed.find(b"\r\n.") >= 0:
            stuffed = stuffed.replace(b"\r\n.", _CRLF)
        else:  # nor will delivery have a line to dot-stuff: it need not look again
            self.dot_free = True
        del stuffed[: len(_CRLF)]
        self._body = stuffed

    @property
    def content(self) -> bytearray:
        """The message as the client meant it (dot-stuffing undone, CRLF line ends kept)."""
        return self._body

    def take(self) -> bytearray:
        """``content``, no longer kept here: its only holder is then the caller."""
        body, self._body = self._body, bytearray()
        return body
