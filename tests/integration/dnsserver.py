"""A tiny authoritative DNS server over real UDP on loopback, for integration tests.

It answers from an in-memory zone with ``dns.message.make_response``, so dnspython's
resolver is exercised over the wire, unmocked. A zone maps an absolute or relative name
to either ``{"MX": ["10 mx.test."], "A": ["127.0.0.2"]}`` (a type missing from the
dict is NODATA) or one of the special answers ``SERVFAIL`` and ``DROP`` (never answer,
so the client times out). A name missing from the zone is NXDOMAIN.

    with TinyDns({"example.test": {"MX": ["10 mx.test."]}}) as server:
        DnsClient([Resolver("127.0.0.1", server.port)], timeout=2.0)
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Mapping
from types import TracebackType
from typing import Final

import dns.flags
import dns.message
import dns.rcode
import dns.rdatatype
import dns.rrset

SERVFAIL: Final = "SERVFAIL"
DROP: Final = "DROP"

Zone = Mapping[str, Mapping[str, list[str]] | str]


def _absolute(name: str) -> str:
    return name.lower().rstrip(".") + "."


class TinyDns:
    """Answers UDP queries from ``zone`` on ``host`` (a free port; see ``.port``).

    ``queries`` records every question asked as ``(name, type)``, e.g.
    ``("mx.test.", "A")``.
    """

    def __init__(self, zone: Zone, host: str = "127.0.0.1") -> None:
        self.zone = {_absolute(name): entry for name, entry in zone.items()}
        self.host = host
        self.port = 0
        self.queries: list[tuple[str, str]] = []
        self._socket: socket.socket | None = None
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()

    def start(self) -> TinyDns:
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.bind((self.host, 0))
        sock.settimeout(0.05)
        self._socket = sock
        self.port = sock.getsockname()[1]
        self._thread = threading.Thread(target=self._serve, name="tiny-dns", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stopping.set()
        if self._thread is not None:
            self._thread.join(5)
            self._thread = None
        if self._socket is not None:
            self._socket.close()
            self._socket = None

    def __enter__(self) -> TinyDns:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def _serve(self) -> None:
        assert self._socket is not None
        while not self._stopping.is_set():
            try:
                wire, peer = self._socket.recvfrom(4096)
            except TimeoutError:
                continue
            answer = self.answer(wire)
            if answer is not None:
                self._socket.sendto(answer, peer)

    def answer(self, wire: bytes) -> bytes | None:
        """The response to one query (None: stay silent)."""
        query = dns.message.from_wire(wire)
        response = dns.message.make_response(query)
        response.flags |= dns.flags.AA
        question = query.question[0]
        name = question.name.to_text().lower()
        rdtype = dns.rdatatype.to_text(question.rdtype)
        self.queries.append((name, rdtype))
        entry = self.zone.get(name)
        if entry is None:
            response.set_rcode(dns.rcode.NXDOMAIN)
        elif entry == DROP:
            return None
        elif entry == SERVFAIL:
            response.set_rcode(dns.rcode.SERVFAIL)
        elif isinstance(entry, Mapping) and entry.get(rdtype):
            response.answer.append(
                dns.rrset.from_text_list(question.name, 60, "IN", rdtype, entry[rdtype])
            )
        return response.to_wire()
