"""Policy files (TOML) -> one frozen, typed ``Config``, validated once at load.

Unknown keys are errors. Every error is a ``ConfigError`` whose text is one line
naming the file, the dotted key and the problem (Postfix's WHERE), e.g.
``policies/relay.toml: outbound.default_level: expected one of may, encrypt, ...``.

Relative paths in a policy are resolved against the data directory (``MTA_HOME``,
default ``./var``), so that ``mta run`` with no arguments keeps everything in one place.
``validate`` is pure; ``load`` and ``load_default`` only add reading the file.
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
import tomllib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Final, Literal, TypeVar

from mta.errors import ConfigError
from mta.model import TlsLevel
from mta.policy.dnssec import ROOT_NS, ProbeSpec, parse_probe
from mta.policy.local import DomainPolicy, Nexthop, most_specific, normalise_fingerprint
from mta.receive.addresses import AddressError, parse_path
from mta.receive.senders import SenderLogin, parse_grant

ListenerMode = Literal["relay", "submission", "smtps"]
LISTENER_MODES: Final = ("relay", "submission", "smtps")
DEFAULT_LEVELS: Final = (TlsLevel.MAY, TlsLevel.ENCRYPT, TlsLevel.VERIFY, TlsLevel.SECURE)
DEFAULT_POLICY_NAME: Final = "relay.toml"

IpNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass(frozen=True, slots=True)
class ListenerConfig:
    address: str = "127.0.0.1"
    port: int = 2525
    mode: ListenerMode = "relay"
    require_tls: bool = False
    # (certificate chain, key) pairs, one per key type (RSA and ECDSA); () = self-signed
    tls_chains: tuple[tuple[Path, Path], ...] = ()
    tls_client_ca: Path | None = None  # ask for client certificates issued by this CA
    require_client_cert: bool = False  # refuse the TLS handshake without one


@dataclass(frozen=True, slots=True)
class SpoolConfig:
    path: Path
    key_file: Path
    max_age: float = 5 * 86400.0


@dataclass(frozen=True, slots=True)
class RelayConfig:
    networks: tuple[IpNetwork, ...]
    local_domains: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class Resolver:
    host: str
    port: int = 53


@dataclass(frozen=True, slots=True)
class DnsConfig:
    resolvers: tuple[Resolver, ...] = ()
    timeout: float = 10.0
    trusted: bool = False  # trust the AD bit of a resolver that is not on loopback
    # the question that must validate (Postfix's dnssec_probe); None: never probe
    dnssec_probe: ProbeSpec | None = ROOT_NS


@dataclass(frozen=True, slots=True)
class DaneConfig:
    enabled: bool = True


@dataclass(frozen=True, slots=True)
class MtaStsConfig:
    enabled: bool = True
    port: int = 443  # of https://mta-sts.<domain>/ (tests use others)
    timeout: float = 10.0
    cache_file: Path = Path("mta-sts-cache.json")
    refresh_interval: float = 3600.0


@dataclass(frozen=True, slots=True)
class TlsConfig:
    ca_file: Path | None = None


@dataclass(frozen=True, slots=True)
class TlsRptConfig:
    """``[tlsrpt]``: daily TLS reports (RFC 8460). Empty strings take their defaults
    from ``hostname`` when the relay starts (``mta.report.tlsrpt_send.report_sender``)."""

    enabled: bool = True
    organization: str = ""  # organization-name; default: the hostname
    contact: str = ""  # contact-info; default: the from address
    from_address: str = ""  # From of report mail; default: tlsrpt-noreply@<hostname>
    dkim_domain: str = ""  # sign report mail (all three, or none)
    dkim_selector: str = ""
    dkim_key: Path | None = None


@dataclass(frozen=True, slots=True)
class ReceiptsConfig:
    """``[receipts]``: the sealed, chained log of every event (``mta.report.receipt_log``),
    which TLS-RPT and the transparency report are computed from."""

    max_age: float = 30 * 86400.0  # day files older than this are removed (>= 2 days)


MIN_RECEIPTS_AGE: Final = 2 * 86400.0  # TLS-RPT reports yesterday's sessions


@dataclass(frozen=True, slots=True)
class MetricsConfig:
    """``[metrics]``: Prometheus ``/metrics`` and the transparency ``/report`` over HTTP
    (``mta.report.http``); ``listen = ""`` turns the listener off."""

    host: str = "127.0.0.1"  # ``listen``, an IP address and port
    port: int = 9464

    @property
    def enabled(self) -> bool:
        return bool(self.host)


@dataclass(frozen=True, slots=True)
class SharedConfig:
    """``[shared]``: state shared by several relays through Redis (``mta.shared``): the
    MTA-STS policy cache and the TLS-RPT counts. ``redis_url = ""``: local files only."""

    redis_url: str = ""  # redis://HOST:PORT/DB, rediss://... (TLS) or unix:///path
    key_file: Path | None = None  # the fleet key, 32 bytes; required with redis_url
    timeout: float = 0.5  # for each Redis call (connect and reply); mail never waits longer
    publish_interval: float = 300.0  # how often a relay adds its TLS-RPT counts

    @property
    def enabled(self) -> bool:
        return bool(self.redis_url)


@dataclass(frozen=True, slots=True)
class PolicyServerConfig:
    """``[policy_server]``: ``mta policy-server``, our policy for Postfix's
    ``smtp_tls_policy_maps`` over socketmap (``mta.postfix.server``)."""

    host: str = "127.0.0.1"  # ``listen``, an IP address and port
    port: int = 8461
    map_name: str = "mta"  # the name in socketmap:inet:HOST:PORT:NAME
    tlsrpt: bool = False  # Postfix >= 3.10: add the TLSRPT attributes to MTA-STS answers
    lookup_timeout: float = 30.0  # to decide one domain, then TEMP
    idle_timeout: float = 300.0  # a client connection silent this long is closed
    max_connections: int = 100  # client connections at once; more are closed


@dataclass(frozen=True, slots=True)
class OutboundConfig:
    port: int = 25
    default_level: TlsLevel = TlsLevel.ENCRYPT
    max_connections: int = 100
    max_per_destination: int = 20
    connect_timeout: float = 30.0
    command_timeout: float = 300.0
    retry_min: float = 300.0
    retry_max: float = 4000.0
    helo_name: str = ""
    honour_tls_required_no: bool = False  # RFC 8689 §4.2.2: off, the header changes nothing


@dataclass(frozen=True, slots=True)
class Route:
    domain: str  # "example.net", ".example.net" (subdomains) or "*"
    nexthop: Nexthop


@dataclass(frozen=True, slots=True)
class LimitsConfig:
    message_size: int = 10 * 1024 * 1024
    recipients: int = 1000
    idle_timeout: float = 300.0  # to send one command (or to stay silent)
    data_timeout: float = 600.0  # to send the whole message after 354, however it trickles
    connections: int = 1000  # inbound sessions in total, every listener together
    connections_per_client: int = 50  # per client address (IPv6: per /84, like Postfix)
    errors: int = 20  # error replies in one session, then 421 and disconnect
    auth_failures: int = 5  # failed AUTH per client address within auth_failure_window...
    auth_failure_window: float = 300.0  # ...then AUTH gets 421 until the window has passed
    junk_commands: int = 100  # NOOP, RSET, VRFY... per accepted message, then 421 (Postfix)
    stress_idle_timeout: float = 10.0  # idle_timeout while sessions are near `connections`
    hop_count: int = 50  # Received:/Delivered-To: fields, ours included: 554 5.4.6 (Postfix)
    header_size: int = 100 * 1024  # one header field, folded lines together: 552 5.3.4
    header_section_size: int = 1024 * 1024  # the whole header section: 552 5.3.4


@dataclass(frozen=True, slots=True)
class AuthConfig:
    password_file: Path | None = None


@dataclass(frozen=True, slots=True)
class ServerConfig:
    """``[server]``: whom the relay runs as (``mta.privileges``)."""

    user: str = ""  # started as root: bind the listeners, then become this user
    allow_root: bool = False  # run on as root without ``user`` (refused otherwise)
    # relay processes, each owning a spool shard (``mta.group``); 1: one process, as ever.
    # A policy file that leaves it out gets ``default_workers()`` (one per CPU).
    workers: int = 1


@dataclass(frozen=True, slots=True)
class LogConfig:
    level: str = "INFO"
    format: Literal["text", "json"] = "text"


@dataclass(frozen=True, slots=True)
class Config:
    source: str
    home: Path
    hostname: str
    listeners: tuple[ListenerConfig, ...]
    spool: SpoolConfig
    relay: RelayConfig
    dns: DnsConfig
    tls: TlsConfig
    outbound: OutboundConfig
    routes: tuple[Route, ...]
    limits: LimitsConfig
    auth: AuthConfig
    log: LogConfig
    dane: DaneConfig
    mta_sts: MtaStsConfig
    policy_server: PolicyServerConfig = PolicyServerConfig()
    domains: tuple[DomainPolicy, ...] = ()
    postmaster: str = ""  # RCPT TO:<postmaster> goes here; "" = postmaster@<hostname>
    sender_logins: tuple[SenderLogin, ...] = ()  # what each AUTH user may send as
    tlsrpt: TlsRptConfig = TlsRptConfig()
    server: ServerConfig = ServerConfig()
    receipts: ReceiptsConfig = ReceiptsConfig()
    metrics: MetricsConfig = MetricsConfig()
    shared: SharedConfig = SharedConfig()

    @property
    def control_socket(self) -> Path:
        """The operator commands' socket (``mta queue flush`` while the relay runs)."""
        return self.spool.path / "control.sock"

    def route_for(self, domain: str) -> Route | None:
        """The most specific route for a recipient domain: exact, then ``.parent``, then ``*``."""
        return most_specific(self.routes, lambda route: route.domain, domain)


# --- duration, nexthop and size parsing (pure helpers, also used by the CLI) ---

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhdw]?)\s*$")
_UNIT_SECONDS: Final = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
_SIZE = re.compile(r"^\s*(\d+)\s*([kKmMgG]?)i?[bB]?\s*$")
_SIZE_UNITS: Final = {"": 1, "k": 1024, "m": 1024**2, "g": 1024**3}
_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")
_USER = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,31}\$?")  # as useradd takes them
_HOSTNAME = re.compile(r"^(?=.{1,253}$)([A-Za-z0-9_]([A-Za-z0-9_-]{0,61}[A-Za-z0-9])?\.?)+$")


def parse_duration(text: str) -> float:
    """``"30s"``, ``"5m"``, ``"4h"``, ``"5d"``, ``"1w"`` or plain seconds -> seconds."""
    match = _DURATION.match(text)
    if not match:
        raise ValueError(f"expected a duration like 30s, 5m, 4h or 5d, got {text!r}")
    return float(match.group(1)) * _UNIT_SECONDS[match.group(2)]


def parse_size(text: str) -> int:
    """``"10MiB"``, ``"512k"``, or plain bytes -> bytes."""
    match = _SIZE.match(text)
    if not match:
        raise ValueError(f"expected a size like 10MiB or 512k, got {text!r}")
    return int(match.group(1)) * _SIZE_UNITS[match.group(2).lower()]


def parse_nexthop(text: str) -> Nexthop:
    """Postfix-style next hop: ``host``, ``host:port``, ``[host]:port``, ``[::1]:25``, ``ip:port``.

    A bare host name gets an MX lookup; ``[host]`` and IP literals do not.
    """
    text = text.strip()
    port: int | None = None
    if text.startswith("["):
        host, sep, rest = text[1:].partition("]")
        if not sep or (rest and not rest.startswith(":")):
            raise ValueError(f"expected [host] or [host]:port, got {text!r}")
        if rest:
            port = _port(rest[1:])
        mx_lookup = False
    else:
        host, sep, port_text = text.rpartition(":") if text.count(":") == 1 else (text, "", "")
        if sep:
            port = _port(port_text)
        mx_lookup = not is_ip(host)
    if not host or not (is_ip(host) or _HOSTNAME.match(host)):
        raise ValueError(f"expected a host name or IP address, got {text!r}")
    return Nexthop(host=host.lower().rstrip("."), port=port, mx_lookup=mx_lookup)


def _port(text: str) -> int:
    if not text.isdigit() or not 0 < int(text) < 65536:
        raise ValueError(f"expected a port from 1 to 65535, got {text!r}")
    return int(text)


def is_ip(text: str) -> bool:
    """Whether ``text`` is an IPv4 or IPv6 address literal."""
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def parse_resolver(text: str) -> Resolver:
    """``"127.0.0.1"``, ``"127.0.0.1:5353"``, ``"::1"`` or ``"[::1]:5353"``."""
    hop = parse_nexthop(text) if not is_ip(text) else Nexthop(text, None, False)
    if not is_ip(hop.host):
        raise ValueError(f"expected an IP address, optionally with :port, got {text!r}")
    return Resolver(host=hop.host, port=hop.port or 53)


# --- validation: raw TOML tables -> Config ---

T = TypeVar("T")


class _Table:
    """A TOML table being read: tracks the dotted key for errors and rejects unknown keys."""

    def __init__(self, source: str, prefix: str, raw: Mapping[str, Any]) -> None:
        self.source, self.prefix, self.raw = source, prefix, raw
        self.used: set[str] = set()

    def key(self, name: str) -> str:
        # A key that is not a bare TOML key is shown quoted, so an error stays one line.
        shown = name if _BARE_KEY.fullmatch(name) else json.dumps(name)
        return f"{self.prefix}.{shown}" if self.prefix else shown

    def error(self, name: str, problem: str) -> ConfigError:
        return ConfigError(self.source, self.key(name), problem)

    def get(self, name: str, kind: type[T], default: T) -> T:
        self.used.add(name)
        if name not in self.raw:
            return default
        value = self.raw[name]
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            raise self.error(name, f"expected {_kind_name(kind)}, got {value!r}")
        return value

    def convert(self, name: str, kind: type[T], default: Any, parse: Callable[[T], Any]) -> Any:
        value = self.get(name, kind, None)
        if value is None:
            return default
        try:
            return parse(value)
        except ValueError as err:
            raise self.error(name, str(err)) from None

    def strings(self, name: str) -> list[str]:
        values = self.get(name, list, [])
        for value in values:
            if not isinstance(value, str):
                raise self.error(name, f"expected a list of strings, got {value!r}")
        return values

    def table(self, name: str) -> _Table:
        raw = self.get(name, dict, {})
        return _Table(self.source, self.key(name), raw)

    def tables(self, name: str) -> list[_Table]:
        raws = self.get(name, list, [])
        out = []
        for index, raw in enumerate(raws):
            if not isinstance(raw, dict):
                raise self.error(name, f"expected [[{self.key(name)}]] tables, got {raw!r}")
            out.append(_Table(self.source, f"{self.key(name)}[{index}]", raw))
        return out

    def done(self) -> None:
        unknown = sorted(set(self.raw) - self.used)
        if unknown:
            raise self.error(unknown[0], "unknown key")


def _kind_name(kind: type) -> str:
    return {
        str: "a string",
        int: "an integer",
        float: "a number",
        bool: "true or false",
        list: "a list",
        dict: "a table",
    }.get(kind, kind.__name__)


def _positive(table: _Table, name: str, kind: type[T], default: T) -> T:
    value = table.get(name, kind, default)
    if not value > 0:  # type: ignore[operator]
        raise table.error(name, f"expected a positive number, got {value!r}")
    return value


def _path(table: _Table, name: str, home: Path, default: str | None) -> Path | None:
    text = table.get(name, str, default)
    if not text:
        return None
    return _path_of(table, name, home, text)


def _path_of(table: _Table, name: str, home: Path, text: str) -> Path:
    if "\0" in text:
        raise table.error(name, "a path cannot hold a NUL character")
    try:
        path = Path(text).expanduser()
    except RuntimeError:  # ~user of no such user
        raise table.error(name, f"cannot expand {text!r}: no such user") from None
    return path if path.is_absolute() else home / path


def _required_path(table: _Table, name: str, home: Path, default: str) -> Path:
    path = _path(table, name, home, default)
    if path is None:
        raise table.error(name, "expected a path, got an empty string")
    return path


def _positive_size(table: _Table, name: str, default: int) -> int:
    value = table.convert(name, str, default, parse_size)
    assert isinstance(value, int)
    if value <= 0:
        raise table.error(name, "expected a positive size")
    return value


def _duration(table: _Table, name: str, default: float) -> float:
    value = table.convert(name, str, default, parse_duration)
    assert isinstance(value, float)
    if value <= 0:
        raise table.error(name, "expected a positive duration")
    return value


def _listener(table: _Table, home: Path) -> ListenerConfig:
    address = table.get("address", str, "127.0.0.1")
    if not is_ip(address):
        raise table.error("address", f"expected an IP address, got {address!r}")
    port = table.convert("port", int, 2525, lambda p: _port(str(p)))
    mode = table.get("mode", str, "relay")
    if mode not in LISTENER_MODES:
        raise table.error("mode", f"expected one of {', '.join(LISTENER_MODES)}, got {mode!r}")
    certs = _paths(table, "tls_cert", home)
    keys = _paths(table, "tls_key", home)
    if len(certs) != len(keys):
        raise table.error(
            "tls_key" if len(keys) < len(certs) else "tls_cert",
            "tls_cert and tls_key go together (as many keys as certificates)",
        )
    client_ca = _path(table, "tls_client_ca", home, None)
    require_client_cert = table.get("require_client_cert", bool, False)
    if require_client_cert and client_ca is None:
        raise table.error("require_client_cert", "needs tls_client_ca")
    listener = ListenerConfig(
        address=address,
        port=port,
        mode=mode,  # type: ignore[arg-type]
        require_tls=table.get("require_tls", bool, mode != "relay"),
        tls_chains=tuple(zip(certs, keys, strict=True)),
        tls_client_ca=client_ca,
        require_client_cert=require_client_cert,
    )
    table.done()
    return listener


def _paths(table: _Table, name: str, home: Path) -> tuple[Path, ...]:
    """A path, or a list of paths (``tls_cert = ["rsa.pem", "ecdsa.pem"]``)."""
    if not isinstance(table.raw.get(name), list):
        path = _path(table, name, home, None)
        return () if path is None else (path,)
    texts = table.strings(name)
    if not all(texts):
        raise table.error(name, "expected paths, got an empty string")
    return tuple(_path_of(table, name, home, text) for text in texts)


def _network(text: str) -> IpNetwork:
    try:
        return ipaddress.ip_network(text, strict=False)
    except ValueError:
        raise ValueError(f"expected an IP network like 127.0.0.0/8, got {text!r}") from None


def _domain(text: str) -> str:
    domain = text.strip().lower().rstrip(".")
    if domain != "*" and not _HOSTNAME.match(domain.lstrip(".")):
        raise ValueError(f"expected a domain name, got {text!r}")
    return domain


def _list_of(table: _Table, name: str, parse: Callable[[str], T]) -> tuple[T, ...]:
    out = []
    for text in table.strings(name):
        try:
            out.append(parse(text))
        except ValueError as err:
            raise table.error(name, str(err)) from None
    return tuple(out)


def _level(text: str) -> TlsLevel:
    try:
        level = TlsLevel.from_label(text)
    except ValueError:
        level = None
    if level not in DEFAULT_LEVELS:
        names = ", ".join(lvl.label for lvl in DEFAULT_LEVELS)
        raise ValueError(f"expected one of {names}, got {text!r}")
    return level


def validate(
    raw: Mapping[str, Any],
    source: str,
    home: Path,
    included: Sequence[tuple[str, Mapping[str, Any]]] = (),
) -> Config:
    """Turn a parsed TOML document into a ``Config``; raise ``ConfigError`` on the first problem.

    Parameters:
        raw: the document as ``tomllib`` returns it.
        source: the file name to put in errors.
        home: the data directory that relative paths are resolved against.
        included: (file name, document) of each file named by ``include``; they may
            hold only ``[[domain]]`` tables.
    """
    top = _Table(source, "", raw)
    top.strings("include")  # read by load(); checked here so a bad value names its key
    hostname = top.get("hostname", str, "")
    postmaster = top.convert("postmaster", str, "", _mailbox)

    listeners = tuple(_listener(t, home) for t in top.tables("listener"))
    if not listeners:
        listeners = (ListenerConfig(),)

    spool_t = top.table("spool")
    spool_path = _required_path(spool_t, "path", home, "spool")
    key_file = _required_path(spool_t, "key_file", home, "keys/spool.key")
    spool = SpoolConfig(spool_path, key_file, _duration(spool_t, "max_age", 5 * 86400.0))
    spool_t.done()

    relay_t = top.table("relay")
    networks = (
        _list_of(relay_t, "networks", _network)
        if "networks" in relay_t.raw
        else (
            _network("127.0.0.0/8"),
            _network("::1/128"),
        )
    )
    relay = RelayConfig(networks, _list_of(relay_t, "local_domains", _domain))
    relay_t.done()

    dns_t = top.table("dns")
    dns = DnsConfig(
        _list_of(dns_t, "resolvers", parse_resolver),
        _duration(dns_t, "timeout", 10.0),
        dns_t.get("trusted", bool, False),
        dns_t.convert("dnssec_probe", str, ROOT_NS, parse_probe),
    )
    dns_t.done()

    dane_t = top.table("dane")
    dane = DaneConfig(enabled=dane_t.get("enabled", bool, True))
    dane_t.done()

    sts_t = top.table("mta_sts")
    cache_file = _required_path(sts_t, "cache_file", home, "mta-sts-cache.json")
    mta_sts = MtaStsConfig(
        enabled=sts_t.get("enabled", bool, True),
        port=sts_t.convert("port", int, 443, lambda p: _port(str(p))),
        timeout=_duration(sts_t, "timeout", 10.0),
        cache_file=cache_file,
        refresh_interval=_duration(sts_t, "refresh_interval", 3600.0),
    )
    sts_t.done()

    tls_t = top.table("tls")
    tls = TlsConfig(ca_file=_path(tls_t, "ca_file", home, None))
    tls_t.done()

    tlsrpt = _tlsrpt(top.table("tlsrpt"), home)
    receipts = _receipts(top.table("receipts"))
    metrics = _metrics(top.table("metrics"))
    shared = _shared(top.table("shared"), home)
    policy_server = _policy_server(top.table("policy_server"))

    out_t = top.table("outbound")
    outbound = OutboundConfig(
        port=out_t.convert("port", int, 25, lambda p: _port(str(p))),
        default_level=out_t.convert("default_level", str, TlsLevel.ENCRYPT, _level),
        max_connections=_positive(out_t, "max_connections", int, 100),
        max_per_destination=_positive(out_t, "max_per_destination", int, 20),
        connect_timeout=_duration(out_t, "connect_timeout", 30.0),
        command_timeout=_duration(out_t, "command_timeout", 300.0),
        retry_min=_duration(out_t, "retry_min", 300.0),
        retry_max=_duration(out_t, "retry_max", 4000.0),
        helo_name=out_t.get("helo_name", str, ""),
        honour_tls_required_no=out_t.get("honour_tls_required_no", bool, False),
    )
    if outbound.retry_max < outbound.retry_min:
        raise out_t.error("retry_max", "must not be shorter than outbound.retry_min")
    out_t.done()

    routes = []
    for route_t in top.tables("route"):
        if "domain" not in route_t.raw or "nexthop" not in route_t.raw:
            missing = "domain" if "domain" not in route_t.raw else "nexthop"
            raise route_t.error(missing, "required")
        routes.append(
            Route(
                domain=route_t.convert("domain", str, "", _domain),
                nexthop=route_t.convert("nexthop", str, None, parse_nexthop),
            )
        )
        route_t.done()

    limits_t = top.table("limits")
    limits = LimitsConfig(
        message_size=limits_t.convert("message_size", str, 10 * 1024 * 1024, parse_size),
        recipients=_positive(limits_t, "recipients", int, 1000),
        idle_timeout=_duration(limits_t, "idle_timeout", 300.0),
        data_timeout=_duration(limits_t, "data_timeout", 600.0),
        connections=_positive(limits_t, "connections", int, 1000),
        connections_per_client=_positive(limits_t, "connections_per_client", int, 50),
        errors=_positive(limits_t, "errors", int, 20),
        auth_failures=_positive(limits_t, "auth_failures", int, 5),
        auth_failure_window=_duration(limits_t, "auth_failure_window", 300.0),
        junk_commands=_positive(limits_t, "junk_commands", int, 100),
        stress_idle_timeout=_duration(limits_t, "stress_idle_timeout", 10.0),
        hop_count=_positive(limits_t, "hop_count", int, 50),
        header_size=_positive_size(limits_t, "header_size", 100 * 1024),
        header_section_size=_positive_size(limits_t, "header_section_size", 1024 * 1024),
    )
    limits_t.done()

    auth_t = top.table("auth")
    auth = AuthConfig(password_file=_path(auth_t, "password_file", home, None))
    auth_t.done()
    sender_logins = _sender_logins(top.tables("sender_login"))

    log_t = top.table("log")
    level = log_t.get("level", str, "INFO").upper()
    if level not in ("DEBUG", "INFO", "WARNING", "ERROR"):
        raise log_t.error("level", f"expected DEBUG, INFO, WARNING or ERROR, got {level!r}")
    fmt = log_t.get("format", str, "text")
    if fmt not in ("text", "json"):
        raise log_t.error("format", f"expected text or json, got {fmt!r}")
    log = LogConfig(level=level, format=fmt)  # type: ignore[arg-type]
    log_t.done()

    server = _server(top.table("server"))

    domains = [_domain_policy(t, home) for t in top.tables("domain")]
    for name, doc in included:
        inc = _Table(name, "", doc)
        domains += [_domain_policy(t, home) for t in inc.tables("domain")]
        inc.done()
    _no_duplicates(domains)

    top.done()
    for listener in listeners:
        if listener.mode == "submission" and auth.password_file is None:
            raise ConfigError(source, "auth.password_file", "required by a submission listener")
    return Config(
        source=source,
        home=home,
        hostname=hostname,
        listeners=listeners,
        spool=spool,
        relay=relay,
        dns=dns,
        tls=tls,
        outbound=outbound,
        routes=tuple(routes),
        limits=limits,
        auth=auth,
        log=log,
        dane=dane,
        mta_sts=mta_sts,
        policy_server=policy_server,
        domains=tuple(domains),
        postmaster=postmaster,
        sender_logins=sender_logins,
        tlsrpt=tlsrpt,
        server=server,
        receipts=receipts,
        metrics=metrics,
        shared=shared,
    )


def default_workers() -> int:
    """``[server] workers`` when unset: one relay process per CPU."""
    return os.cpu_count() or 1


MAX_WORKERS: Final = 256


def _server(table: _Table) -> ServerConfig:
    """``[server]``: a user name as ``getpwnam`` takes it (looked up when the relay starts);
    ``workers`` from 1 to ``MAX_WORKERS``."""
    user = table.get("user", str, "")
    if user and not _USER.fullmatch(user):
        raise table.error("user", f"expected a user name like mta, got {user!r}")
    workers = table.get("workers", int, default_workers())
    if not 1 <= workers <= MAX_WORKERS:
        raise table.error("workers", f"expected 1 to {MAX_WORKERS} processes, got {workers}")
    config = ServerConfig(
        user=user, allow_root=table.get("allow_root", bool, False), workers=workers
    )
    table.done()
    return config


def _receipts(table: _Table) -> ReceiptsConfig:
    """``[receipts]``: ``max_age`` at least two days (TLS-RPT reads yesterday's)."""
    max_age = _duration(table, "max_age", 30 * 86400.0)
    if max_age < MIN_RECEIPTS_AGE:
        raise table.error("max_age", "must be at least 2d (TLS reports cover yesterday)")
    table.done()
    return ReceiptsConfig(max_age=max_age)


def _metrics(table: _Table) -> MetricsConfig:
    """``[metrics]``: ``listen`` is ``IP:PORT`` (IPv6 in brackets, ``[::1]:9464``) or ``""``."""

    def listen(text: str) -> tuple[str, int]:
        if not text:
            return "", 0
        try:
            hop = parse_nexthop(text)
        except ValueError:
            hop = None
        if hop is None or not is_ip(hop.host) or hop.port is None:
            raise ValueError(
                f'expected IP:PORT (127.0.0.1:9464, [::1]:9464) or "" for off, got {text!r}'
            )
        return hop.host, hop.port

    host, port = table.convert("listen", str, ("127.0.0.1", 9464), listen)
    table.done()
    return MetricsConfig(host=host, port=port)


MAX_PUBLISH_INTERVAL: Final = 600.0
MAX_SHARED_TIMEOUT: Final = 5.0  # a Redis call may delay a delivery this long at most
_REDIS_SCHEMES: Final = ("redis://", "rediss://", "unix://")


def _shared(table: _Table, home: Path) -> SharedConfig:
    """``[shared]``: a Redis URL (or ""), and with it the fleet key file."""
    url = table.get("redis_url", str, "")
    if url and not url.startswith(_REDIS_SCHEMES):
        raise table.error(
            "redis_url", f"expected redis://HOST:PORT/DB, rediss://... or unix:///PATH, got {url!r}"
        )
    key_file = _path(table, "key_file", home, None)
    if url and key_file is None:
        raise table.error("key_file", "required with shared.redis_url (32 random bytes)")
    timeout = _duration(table, "timeout", 0.5)
    if timeout > MAX_SHARED_TIMEOUT:
        raise table.error("timeout", f"at most {MAX_SHARED_TIMEOUT:g}s: mail waits for it")
    interval = _duration(table, "publish_interval", 300.0)
    if interval > MAX_PUBLISH_INTERVAL:  # the fleet sends 15 minutes after midnight
        raise table.error("publish_interval", "at most 10m: the fleet reports after 15m")
    config = SharedConfig(url, key_file, timeout, interval)
    table.done()
    return config


def _tlsrpt(table: _Table, home: Path) -> TlsRptConfig:
    """``[tlsrpt]``; the DKIM keys come as all three or none."""
    domain = table.convert("dkim_domain", str, "", lambda text: _domain(text) if text else "")
    selector = table.get("dkim_selector", str, "")
    if selector and not _HOSTNAME.fullmatch(selector):
        raise table.error("dkim_selector", f"expected a DNS label, got {selector!r}")
    key = _path(table, "dkim_key", home, None)
    given = {"dkim_domain": bool(domain), "dkim_selector": bool(selector), "dkim_key": bool(key)}
    if any(given.values()) and not all(given.values()):
        missing = next(name for name, present in given.items() if not present)
        present = next(name for name, present in given.items() if present)
        raise table.error(missing, f"required with {table.key(present)}")
    config = TlsRptConfig(
        enabled=table.get("enabled", bool, True),
        organization=table.get("organization", str, ""),
        contact=table.get("contact", str, ""),
        from_address=table.convert("from", str, "", _mailbox),
        dkim_domain=domain,
        dkim_selector=selector,
        dkim_key=key,
    )
    table.done()
    return config


def _policy_server(table: _Table) -> PolicyServerConfig:
    """``[policy_server]``: ``listen`` is an IP address with a port, as Postfix's
    ``socketmap:inet:`` names it; the map name is one word (it ends the socketmap name)."""

    def listen(text: str) -> tuple[str, int]:
        hop = parse_nexthop(text)
        if not is_ip(hop.host):
            raise ValueError(f"expected IP:PORT (e.g. 127.0.0.1:8461), got {text!r}")
        return hop.host, hop.port or 8461

    host, port = table.convert("listen", str, ("127.0.0.1", 8461), listen)
    name = table.get("map_name", str, "mta")
    if not _BARE_KEY.fullmatch(name):
        raise table.error("map_name", f"expected letters, digits, - or _, got {name!r}")
    config = PolicyServerConfig(
        host=host,
        port=port,
        map_name=name,
        tlsrpt=table.get("tlsrpt", bool, False),
        lookup_timeout=_duration(table, "lookup_timeout", 30.0),
        idle_timeout=_duration(table, "idle_timeout", 300.0),
        max_connections=_positive(table, "max_connections", int, 100),
    )
    table.done()
    return config


def _mailbox(text: str) -> str:
    """An address as the relay stores it (``parse_path``), or ``""`` for an empty string."""
    if not text.strip():
        return ""
    try:
        path = parse_path(text)
    except AddressError as err:
        raise ValueError(
            f"expected an address like postmaster@example.com, got {text!r}: {err}"
        ) from None
    if path.route:
        raise ValueError(f"expected an address without a source route, got {text!r}")
    return path.address


def _sender_logins(tables: Sequence[_Table]) -> tuple[SenderLogin, ...]:
    """The ``[[sender_login]]`` tables: one per AUTH user, naming what else it may send as."""
    logins: dict[str, SenderLogin] = {}
    for table in tables:
        if "user" not in table.raw:
            raise table.error("user", "required")
        user = table.get("user", str, "")
        if not user or any(c.isspace() or c == ":" for c in user):
            raise table.error("user", f"expected a user name of the password file, got {user!r}")
        if user in logins:
            raise table.error("user", f"{user!r} already has a [[sender_login]] table")
        logins[user] = SenderLogin(user, _list_of(table, "senders", parse_grant))
        table.done()
    return tuple(logins.values())


def _domain_policy(table: _Table, home: Path) -> DomainPolicy:
    """One ``[[domain]]`` table: a local policy that outranks DANE and MTA-STS."""
    for required in ("name", "level"):
        if required not in table.raw:
            raise table.error(required, "required")
    name = table.convert("name", str, "", _domain)
    if name == "*":
        raise table.error("name", "a domain policy names a domain or .parent, not *")
    level = table.convert("level", str, TlsLevel.ENCRYPT, _any_level)
    fingerprints = _list_of(table, "fingerprints", normalise_fingerprint)
    if level is TlsLevel.FINGERPRINT and not fingerprints:
        raise table.error("fingerprints", 'required with level = "fingerprint"')
    if fingerprints and level is not TlsLevel.FINGERPRINT:
        raise table.error("fingerprints", 'only used with level = "fingerprint"')
    cert = _path(table, "client_cert", home, None)
    key = _path(table, "client_key", home, None)
    if (cert is None) != (key is None):
        missing = "client_key" if key is None else "client_cert"
        raise table.error(missing, "client_cert and client_key go together")
    policy = DomainPolicy(
        name=name,
        level=level,
        fingerprints=fingerprints,
        client_cert=cert,
        client_key=key,
        nexthop=table.convert("nexthop", str, None, parse_nexthop),
        ca_file=_path(table, "ca_file", home, None),
        source=table.source,
    )
    table.done()
    return policy


def _any_level(text: str) -> TlsLevel:
    try:
        return TlsLevel.from_label(text)
    except ValueError:
        names = ", ".join(level.label for level in TlsLevel)
        raise ValueError(f"expected one of {names}, got {text!r}") from None


def _no_duplicates(domains: Sequence[DomainPolicy]) -> None:
    seen: dict[str, DomainPolicy] = {}
    for policy in domains:
        first = seen.setdefault(policy.name, policy)
        if first is not policy:
            raise ConfigError(
                policy.source, "domain.name", f"{policy.name} is already set in {first.source}"
            )


def data_home(environ: Mapping[str, str] = os.environ) -> Path:
    """The data directory: ``$MTA_HOME``, else ``./var``."""
    return Path(environ.get("MTA_HOME") or "var").absolute()


def _parse_toml(text: str, source: str) -> dict[str, Any]:
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(source, "(syntax)", str(err)) from None
    except RecursionError:  # arrays or inline tables nested thousands deep
        raise ConfigError(source, "(syntax)", "values nested too deeply") from None


def _read(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(path, "(file)", f"cannot read: {err}") from None


def parse_text(text: str, source: str, home: Path) -> Config:
    """Parse and validate TOML text (no includes); a TOML syntax error is a ``ConfigError`` too."""
    raw = _parse_toml(text, source)
    if raw.get("include"):
        raise ConfigError(source, "include", "only a policy file on disk may include others")
    return validate(raw, source, home)


def load(path: Path, home: Path | None = None) -> Config:
    """Read and validate a policy file and the files its ``include`` patterns name.

    Patterns are globs relative to the including file's directory, read in sorted order.
    """
    raw = _parse_toml(_read(path), str(path))
    patterns = raw.get("include", [])
    included: list[tuple[str, Mapping[str, Any]]] = []
    if isinstance(patterns, list):
        for pattern in patterns:
            if not isinstance(pattern, str):
                continue  # validate() reports the bad value with its key
            if not pattern or Path(pattern).is_absolute():  # glob() raises on these
                raise ConfigError(
                    path, "include", f"{pattern!r}: must be a pattern relative to {path.parent}"
                )
            matches = sorted(path.parent.glob(pattern))
            if not matches and not any(c in pattern for c in "*?["):
                raise ConfigError(path, "include", f"no such file: {pattern}")
            for name in matches:
                included.append((str(name), _parse_toml(_read(name), str(name))))
    return validate(raw, str(path), home or data_home(), included)


def default_policy_text() -> str:
    """The embedded default policy (a copy of ``policies/relay.toml`` in the package)."""
    return resources.files("mta").joinpath(DEFAULT_POLICY_NAME).read_text(encoding="utf-8")


def load_default(home: Path | None = None) -> Config:
    """The embedded default policy: what ``mta run`` uses with no ``--config``."""
    return parse_text(
        default_policy_text(), f"(embedded {DEFAULT_POLICY_NAME})", home or data_home()
    )
