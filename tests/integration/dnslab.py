"""A DNSSEC lab on loopback: knotd serves a signed ``test.`` and its child zones, unbound validates.

The integration tests need real DNSSEC answers (the AD bit, SERVFAIL for bogus data),
so this builds the smallest honest setup:

- every signed zone gets one ECDSA P-256 key (``ldns-keygen -k``), used as KSK and ZSK,
  and is signed offline with ``ldns-signzone`` (NSEC, signatures valid from yesterday for
  ten years: RRSIG times are serial numbers, so "far future" must stay within 68 years);
- each child zone is delegated from its closest enclosing zone (``test.`` unless another
  lab zone is closer) with NS and, when signed, the DS of its key; an unsigned child is an
  insecure delegation (NS, no DS, the parent's NSEC proves it); a ``bogus`` child is
  signed, but its parent publishes the DS of a different key, so unbound answers
  SERVFAIL for every name in it;
- knotd only serves the signed files (no signing, no journal) on 127.0.0.1;
- unbound validates with the DS of ``test.`` as its only trust anchor, reaches knot
  through a stub zone, refuses every name outside ``test.`` (the lab never leaves
  loopback), and runs in the foreground: no chroot, no user change, no syslog;
- ``start_plain_resolver()`` starts a second unbound like it but with validation off
  (no validator module, no trust anchor): it never sets AD, so a relay pointed at it
  fails its DNSSEC probe (``PROBE`` is the probe that passes on the validating one).

Both servers run as child processes; their configuration and logs are in ``workdir``.
They are stopped by ``stop()``, by the context manager, when the lab is garbage
collected, at interpreter exit, and by the kernel if this process dies
(``PR_SET_PDEATHSIG``). Ports are probed free on UDP and TCP, never handed out twice by
this process, and a server is only "ready" once it answers a per-lab token.

    with DnsLab(tmp_path) as lab:
        lab.add_zone("secure.test", ["@ MX 10 mx", "mx A 127.0.0.1"])
        lab.add_zone("plain.test", ["@ MX 10 mx", "mx A 127.0.0.1"], signed=False)
        host, port = lab.start()
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import secrets
import signal
import socket
import subprocess
import threading
import time
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Final

import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.query
import dns.rcode
import dns.rdatatype

PARENT: Final = "test."
READY_TIMEOUT: Final = 10.0
STOP_TIMEOUT: Final = 5.0
TTL: Final = 300
SIGNATURE_LIFETIME: Final = 10 * 365 * 86400  # well inside RRSIG serial arithmetic (68 years)
TOKEN_NAME: Final = "_dnslab.test."
PROBE: Final = "ns:test."  # dns.dnssec_probe for a relay using the lab (the root is refused)

KNOTD: Final = "/usr/sbin/knotd"
UNBOUND: Final = "/usr/sbin/unbound"
LDNS_KEYGEN: Final = "ldns-keygen"
LDNS_SIGNZONE: Final = "ldns-signzone"
LDNS_READ_ZONE: Final = "ldns-read-zone"

_PR_SET_PDEATHSIG: Final = 1
# Loaded here, not in the child: between fork and exec nothing may take locks or spawn.
_LIBC: ctypes.CDLL | None = ctypes.CDLL(None) if os.uname().sysname == "Linux" else None

_handed_out: set[tuple[str, int]] = set()
_ports_lock = threading.Lock()


def free_port(host: str) -> int:
    """A port free on ``host`` for both UDP and TCP, never returned twice by this process."""
    for _ in range(100):
        with (
            socket.socket(socket.AF_INET, socket.SOCK_STREAM) as tcp,
            socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp,
        ):
            tcp.bind((host, 0))
            port: int = tcp.getsockname()[1]
            try:
                udp.bind((host, port))
            except OSError:
                continue
        with _ports_lock:
            if (host, port) in _handed_out:
                continue
            _handed_out.add((host, port))
        return port
    raise RuntimeError(f"no free UDP+TCP port on {host}")


def _absolute(name: str) -> str:
    return name.strip().lower().rstrip(".") + "."


def _is_below(name: str, zone: str) -> bool:
    """``name`` is ``zone`` or one of its subdomains (both absolute)."""
    return dns.name.from_text(name).is_subdomain(dns.name.from_text(zone))


def _die_with_parent() -> None:  # pragma: no cover - runs in the child between fork and exec
    """Linux: the server gets SIGKILL when the test process dies, even by SIGKILL."""
    if _LIBC is not None:
        _LIBC.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


def _run(args: list[str], cwd: Path) -> str:
    """Run an ldns tool; its stderr becomes the error."""
    done = subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=30, check=False)
    if done.returncode != 0:
        output = f"{done.stderr.strip()} {done.stdout.strip()}".strip()
        raise RuntimeError(f"{' '.join(args)} failed ({done.returncode}): {output}")
    return done.stdout


def _kill_all(procs: list[subprocess.Popen[bytes]]) -> None:
    """Stop every process in ``procs`` (TERM, then KILL), newest first; empties the list."""
    while procs:
        proc = procs.pop()
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(STOP_TIMEOUT)


def _ask(
    host: str, port: int, name: str, rdtype: str, *, dnssec: bool, timeout: float = 0.1
) -> dns.message.Message | None:
    """One UDP query, or None when nothing answered in time."""
    query = dns.message.make_query(name, rdtype, want_dnssec=dnssec)
    if dnssec:
        query.flags |= dns.flags.AD
    try:
        return dns.query.udp(query, host, port=port, timeout=timeout)
    except (dns.exception.DNSException, OSError):
        return None


@dataclass
class _Zone:
    name: str  # absolute, lower case
    records: list[str]
    signed: bool
    bogus: bool
    parent: str = ""
    ds: list[str] = field(default_factory=list)  # what the parent publishes


class DnsLab:
    """knotd (authoritative, signed zones) and unbound (validating) on loopback.

    Parameters:
        workdir: where zones, keys, configuration and the two logs go (``knot.log``,
            ``unbound.log``); created if missing.
        knot_host, unbound_host: loopback addresses the two servers listen on.
        unbound_port: the validating unbound's port; 0 probes a free one. 53 lets
            programs that only read resolv.conf (Postfix) use the lab.
    """

    def __init__(
        self,
        workdir: Path,
        *,
        knot_host: str = "127.0.0.1",
        unbound_host: str = "127.0.0.53",
        unbound_port: int = 0,
    ) -> None:
        self.workdir = Path(workdir).resolve()
        self.knot_host = knot_host
        self.unbound_host = unbound_host
        self.knot_port = 0
        self.unbound_port = 0
        self._fixed_unbound_port = unbound_port
        self.startup_seconds = 0.0
        self.token = secrets.token_hex(8)
        self._zones: dict[str, _Zone] = {PARENT: _Zone(PARENT, [], signed=True, bogus=False)}
        self._procs: list[subprocess.Popen[bytes]] = []
        self._finalizer = weakref.finalize(self, _kill_all, self._procs)
        self._started = False

    # --- building ---

    def add_zone(
        self, name: str, records: list[str], *, signed: bool = True, bogus: bool = False
    ) -> None:
        """Add a zone under ``test.`` (or records to ``test.`` itself).

        ``records`` are zone-file lines ("owner [ttl] type rdata"); relative owners and
        targets are relative to the zone, ``@`` is its apex. SOA and NS are added.
        ``signed=False`` makes an insecure delegation; ``bogus=True`` a signed zone
        whose DS in the parent matches no key of it (every name in it is SERVFAIL).
        """
        if self._started:
            raise RuntimeError("add zones before start()")
        zone = _absolute(name)
        if not _is_below(zone, PARENT):
            raise ValueError(f"{name!r} is not under {PARENT}")
        if bogus and not signed:
            raise ValueError("a bogus zone is a signed one")
        if zone == PARENT:
            if not signed or bogus:
                raise ValueError(f"{PARENT} is the trust anchor: it is signed and valid")
            self._zones[PARENT].records.extend(records)
            return
        if zone in self._zones:
            raise ValueError(f"zone {zone} added twice")
        self._zones[zone] = _Zone(zone, list(records), signed=signed, bogus=bogus)

    @property
    def address(self) -> tuple[str, int]:
        """unbound's address and port (valid after ``start()``)."""
        return self.unbound_host, self.unbound_port

    @property
    def trust_anchor(self) -> str:
        """The DS record of ``test.`` that unbound trusts (after ``start()``)."""
        return (self.workdir / "trust-anchor.ds").read_text()

    def _prepare(self) -> None:
        """Keys, delegations, signed zone files (children before their parents)."""
        zones_dir = self.workdir / "zones"
        keys_dir = self.workdir / "keys"
        for path in (zones_dir, keys_dir):
            path.mkdir(parents=True, exist_ok=True)
        names = sorted(self._zones, key=lambda z: -len(dns.name.from_text(z)))
        for zone in self._zones.values():
            zone.ds = []
            if zone.name != PARENT:
                enclosing = [p for p in self._zones if p != zone.name and _is_below(zone.name, p)]
                zone.parent = max(enclosing, key=lambda p: len(dns.name.from_text(p)))
        inception = int(time.time()) - 86400
        expiration = inception + SIGNATURE_LIFETIME
        for name in names:  # deepest first: a zone's DS is known before its parent is signed
            zone = self._zones[name]
            text = self._zone_text(zone)
            path = zones_dir / f"{name}zone"
            path.write_text(text)
            if not zone.signed:
                _run([LDNS_READ_ZONE, str(path)], keys_dir)  # syntax check only
                continue
            key = self._keygen(name, keys_dir)
            _run(
                [
                    LDNS_SIGNZONE,
                    "-i",
                    str(inception),
                    "-e",
                    str(expiration),
                    "-f",
                    str(path),
                    "-o",
                    name,
                    str(path),
                    str(keys_dir / key),
                ],
                keys_dir,
            )
            ds_key = self._keygen(name, keys_dir) if zone.bogus else key
            ds = (keys_dir / f"{ds_key}.ds").read_text().strip()
            if zone.name == PARENT:
                (self.workdir / "trust-anchor.ds").write_text(ds + "\n")
            else:
                self._zones[zone.parent].ds.append(ds)

    def _zone_text(self, zone: _Zone) -> str:
        lines = [
            f"$ORIGIN {zone.name}",
            f"$TTL {TTL}",
            f"@ SOA ns.{PARENT} hostmaster.{PARENT} 1 3600 600 86400 {TTL}",
            f"@ NS ns.{PARENT}",
        ]
        if zone.name == PARENT:
            lines += [f"ns A {self.knot_host}", f'{TOKEN_NAME} TXT "{self.token}"']
        for child in self._zones.values():
            if child.parent == zone.name:
                lines.append(f"{child.name} NS ns.{PARENT}")
        lines += zone.ds
        lines += zone.records
        return "\n".join(lines) + "\n"

    @staticmethod
    def _keygen(name: str, keys_dir: Path) -> str:
        """A new ECDSA P-256 key with the SEP flag (KSK) for ``name``: its base file name."""
        return _run([LDNS_KEYGEN, "-a", "ECDSAP256SHA256", "-k", name], keys_dir).strip()

    def _knot_conf(self) -> Path:
        run_dir = self.workdir / "knot"
        run_dir.mkdir(exist_ok=True)
        zones = "".join(
            f'  - domain: "{name}"\n    file: "{self.workdir / "zones" / (name + "zone")}"\n'
            for name in self._zones
        )
        conf = self.workdir / "knot.conf"
        conf.write_text(
            "server:\n"
            f'  rundir: "{run_dir}"\n'
            f"  listen: {self.knot_host}@{self.knot_port}\n"
            "  udp-workers: 1\n"
            "  tcp-workers: 1\n"
            "  background-workers: 1\n"
            '  identity: ""\n'
            '  version: ""\n'
            '  nsid: ""\n'
            "control:\n"
            f'  listen: "{self._control_socket()}"\n'
            "database:\n"
            f'  storage: "{run_dir}"\n'
            "log:\n"
            f'  - target: "{self.workdir / "knot.log"}"\n'
            "    any: info\n"
            "template:\n"
            "  - id: default\n"
            "    zonefile-sync: -1\n"
            "    zonefile-load: whole\n"
            "    journal-content: none\n"
            "    semantic-checks: off\n"
            "    dnssec-signing: off\n"
            "zone:\n" + zones
        )
        return conf

    def _control_socket(self) -> Path:
        """knot's control socket; a short path, since sun_path holds 107 bytes."""
        path = self.workdir / "knot" / "knot.sock"
        if len(str(path)) < 100:
            return path
        short = Path("/tmp") / f"dnslab-{os.getpid()}-{self.token}.sock"
        return short

    def _unbound_conf(self, port: int, *, validating: bool = True) -> Path:
        name = "unbound" if validating else "unbound-plain"
        if validating:
            validation = (
                '  module-config: "validator iterator"\n'
                f'  trust-anchor-file: "{self.workdir / "trust-anchor.ds"}"\n'
            )
        else:
            validation = '  module-config: "iterator"\n'
        conf = self.workdir / f"{name}.conf"
        conf.write_text(
            "server:\n"
            f"  interface: {self.unbound_host}@{port}\n"
            f"  port: {port}\n"
            "  interface-automatic: no\n"
            f"  outgoing-interface: {self.knot_host}\n"
            "  do-ip4: yes\n"
            "  do-ip6: no\n"
            "  do-udp: yes\n"
            "  do-tcp: yes\n"
            "  num-threads: 1\n"
            "  outgoing-range: 64\n"
            "  so-reuseport: no\n"
            '  chroot: ""\n'
            '  username: ""\n'
            f'  directory: "{self.workdir}"\n'
            f'  pidfile: "{self.workdir / (name + ".pid")}"\n'
            "  use-syslog: no\n"
            f'  logfile: "{self.workdir / (name + ".log")}"\n'
            "  log-time-ascii: yes\n"
            "  verbosity: 1\n"
            "  val-log-level: 2\n"
            "  access-control: 127.0.0.0/8 allow\n"
            "  do-not-query-localhost: no\n" + validation + "  trust-anchor-signaling: no\n"
            "  root-key-sentinel: no\n"
            "  val-permissive-mode: no\n"
            "  harden-dnssec-stripped: yes\n"
            "  aggressive-nsec: no\n"
            "  qname-minimisation: no\n"
            "  prefetch: no\n"
            "  hide-identity: yes\n"
            "  hide-version: yes\n"
            f'  local-zone: "{PARENT}" transparent\n'
            '  local-zone: "." refuse\n'
            "remote-control:\n"
            "  control-enable: no\n"
            "stub-zone:\n"
            f'  name: "{PARENT}"\n'
            f"  stub-addr: {self.knot_host}@{self.knot_port}\n"
        )
        return conf

    # --- running ---

    def start(self) -> tuple[str, int]:
        """Sign the zones, start knot, then unbound; return unbound's (address, port)."""
        if self._started:
            return self.address
        began = time.monotonic()
        self.workdir.mkdir(parents=True, exist_ok=True)
        self._started = True
        try:
            self._prepare()
            self._start_knot()
            self._start_unbound()
        except BaseException:
            self.stop()
            raise
        self.startup_seconds = time.monotonic() - began
        return self.address

    def _spawn(self, args: list[str], log_name: str) -> subprocess.Popen[bytes]:
        with (self.workdir / log_name).open("ab") as log:
            proc = subprocess.Popen(
                args,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.workdir,
                preexec_fn=_die_with_parent,
            )
        self._procs.append(proc)
        return proc

    def _start_knot(self) -> None:
        for _attempt in range(3):
            self.knot_port = free_port(self.knot_host)
            proc = self._spawn([KNOTD, "-c", str(self._knot_conf())], "knot.stdout")
            if self._wait_knot(proc):
                return
            _kill_all(self._procs)
        raise RuntimeError(f"knotd did not come up:\n{self._tail('knot.log', 'knot.stdout')}")

    def _wait_knot(self, proc: subprocess.Popen[bytes]) -> bool:
        """Every zone answers its SOA with AA, and ``test.`` the lab's token."""
        deadline = time.monotonic() + READY_TIMEOUT
        pending = set(self._zones)
        while time.monotonic() < deadline and proc.poll() is None:
            for name in sorted(pending):
                reply = _ask(self.knot_host, self.knot_port, name, "SOA", dnssec=False)
                if (
                    reply is not None
                    and reply.rcode() == dns.rcode.NOERROR
                    and reply.flags & dns.flags.AA
                    and reply.answer
                ):
                    pending.discard(name)
            if not pending and self._token_answered(self.knot_port, knot=True):
                return True
            time.sleep(0.02)
        return False

    def _start_unbound(self, *, validating: bool = True) -> int:
        name = "unbound" if validating else "unbound-plain"
        for _attempt in range(3):
            fixed = self._fixed_unbound_port if validating else 0
            port = fixed or free_port(self.unbound_host)
            conf = self._unbound_conf(port, validating=validating)
            proc = self._spawn([UNBOUND, "-d", "-p", "-c", str(conf)], f"{name}.stdout")
            if self._wait_unbound(proc, port, validating=validating):
                if validating:
                    self.unbound_port = port
                return port
            self._procs.remove(proc)
            _kill_all([proc])
        raise RuntimeError(
            f"unbound did not come up:\n{self._tail(f'{name}.log', f'{name}.stdout')}"
        )

    def start_plain_resolver(self) -> tuple[str, int]:
        """A second unbound over the same knot, with validation off (after ``start()``):
        the same answers, never the AD bit. Returns its (address, port)."""
        if not self._started:
            raise RuntimeError("start() the lab first")
        return self.unbound_host, self._start_unbound(validating=False)

    def _wait_unbound(self, proc: subprocess.Popen[bytes], port: int, *, validating: bool) -> bool:
        """unbound answers the token through knot (validated, AD, when ``validating``)."""
        deadline = time.monotonic() + READY_TIMEOUT
        while time.monotonic() < deadline and proc.poll() is None:
            if self._token_answered(port, knot=False, validated=validating):
                return True
            time.sleep(0.02)
        return False

    def _token_answered(self, port: int, *, knot: bool, validated: bool = True) -> bool:
        host = self.knot_host if knot else self.unbound_host
        reply = _ask(host, port, TOKEN_NAME, "TXT", dnssec=not knot)
        if reply is None or reply.rcode() != dns.rcode.NOERROR:
            return False
        if not knot and validated and not reply.flags & dns.flags.AD:
            return False
        return any(
            rdata.to_text() == f'"{self.token}"'
            for rrset in reply.answer
            if rrset.rdtype == dns.rdatatype.TXT
            for rdata in rrset
        )

    def _tail(self, *names: str, lines: int = 30) -> str:
        out = []
        for name in names:
            path = self.workdir / name
            if path.exists():
                text = path.read_text(errors="replace").splitlines()[-lines:]
                out.append(f"--- {name}\n" + "\n".join(text))
        return "\n".join(out)

    def stop(self) -> None:
        """Stop unbound, then knot. Safe to call twice."""
        _kill_all(self._procs)
        with contextlib.suppress(OSError):
            sock = self._control_socket()
            if sock.parent == Path("/tmp"):
                sock.unlink(missing_ok=True)

    def __enter__(self) -> DnsLab:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
