"""The ``mta`` command: run | queue | stats | reload | keys | passwd | check | policy-server |
tlsrpt | receipts | policy.

Exit status: 0 ok, 1 operational failure (e.g. a refused key file), 2 bad policy or
usage. Errors are one line on stderr naming the file, the key and the problem.
"""

from __future__ import annotations

import argparse
import asyncio
import getpass
import json
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

from mta import __version__, config, control, shards
from mta.clock import SystemClock
from mta.errors import ConfigError, MtaError
from mta.log import setup as setup_logging
from mta.queueops import Action, SelectionError, make_selection
from mta.queueview import entry_dict, entry_line, flush_offline, key_usage, list_queue
from mta.receive.auth import add_user
from mta.report import receipt_log
from mta.shared import fleet_key
from mta.shared.state import SharedState, open_shared
from mta.spool import keycheck
from mta.spool.keys import KeyRing
from mta.spool.store import SpoolDirectory, SpoolStore

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_CONFIG = 2
REWRAP_WAIT = 3600.0  # seconds for a running relay to re-wrap its whole spool
RELOAD_WAIT = 120.0  # seconds for a reload (it reads every queued record's key id)


def _load(args: argparse.Namespace) -> config.Config:
    if args.config is None:
        return config.load_default()
    return config.load(Path(args.config))


def cmd_run(args: argparse.Namespace) -> int:
    cfg = _load(args)
    if args.allow_root:  # the command line's word for [server] allow_root = true
        cfg = replace(cfg, server=replace(cfg.server, allow_root=True))
    setup_logging(cfg.log.level, cfg.log.format)
    # imported here: they pull in the event loop and every I/O module
    if cfg.server.workers > 1:
        from mta import group

        group.run(cfg)
    else:
        from mta import app

        app.run(cfg)
    return EXIT_OK


def cmd_worker(args: argparse.Namespace) -> int:
    """One relay of a group, started by ``mta run`` (``mta.group``), not by hand."""
    import socket

    from mta import app, shards

    cfg = _load(args)
    if args.allow_root:
        cfg = replace(cfg, server=replace(cfg.server, allow_root=True))
    setup_logging(cfg.log.level, cfg.log.format)
    channel = socket.socket(fileno=args.channel)
    worker = app.Worker(args.shard, channel)
    app.run(shards.worker_config(cfg, args.shard), worker)
    return EXIT_OK


def cmd_queue_list(args: argparse.Namespace) -> int:
    cfg = _load(args)
    now = time.time()
    entries = asyncio.run(list_queue(cfg, now=now))
    if args.json:
        print(json.dumps([entry_dict(entry) for entry in entries], indent=2))
        return EXIT_OK
    if not entries:
        print("Mail queue is empty")
        return EXIT_OK
    print(f"{'QUEUE ID':<22} {'AGE':>7}  {'NEXT':>7}  DOMAINS / LAST ERROR")
    for entry in entries:
        print(entry_line(entry, now))
    print(f"-- {len(entries)} message(s)")
    return EXIT_OK


def cmd_queue_flush(args: argparse.Namespace) -> int:
    cfg = _load(args)
    answer = control.ask(cfg.control_socket, "flush")
    if answer is None:
        count = asyncio.run(flush_offline(cfg, now=time.time()))
        print(f"relay not running; {count} message(s) marked due now for its next start")
        return EXIT_OK
    if not answer.startswith("ok"):
        print(f"mta: relay answered: {answer}", file=sys.stderr)
        return EXIT_FAILURE
    print(f"flushed: {answer.removeprefix('ok').strip()} message(s) due now")
    return EXIT_OK


def cmd_queue_show(args: argparse.Namespace) -> int:
    from mta import queuetools  # imported here: it pulls in the scheduler

    cfg = _load(args)
    try:
        (qid,) = make_selection([args.qid]).qids
    except SelectionError as err:
        print(f"mta: {err}", file=sys.stderr)
        return EXIT_CONFIG
    return EXIT_OK if queuetools.show(cfg, qid, as_json=args.json, body=args.body) else EXIT_FAILURE


def cmd_queue_change(args: argparse.Namespace) -> int:
    from mta import queuetools  # imported here: it pulls in the scheduler

    cfg = _load(args)
    every = getattr(args, "all", False)
    try:
        selection = make_selection(args.qids, every=every, domain=args.domain or "")
    except SelectionError as err:
        print(f"mta: {err}", file=sys.stderr)
        return EXIT_CONFIG
    ok = queuetools.change(cfg, Action(args.action), selection)
    return EXIT_OK if ok else EXIT_FAILURE


def cmd_stats(args: argparse.Namespace) -> int:
    cfg = _load(args)
    answer = control.ask(cfg.control_socket, "stats")
    if answer is None:
        print("mta: relay not running", file=sys.stderr)
        return EXIT_FAILURE
    if not answer.startswith("ok"):
        print(f"mta: relay answered: {answer}", file=sys.stderr)
        return EXIT_FAILURE
    print(answer.removeprefix("ok").strip())
    return EXIT_OK


def cmd_reload(args: argparse.Namespace) -> int:
    """``mta reload``: the running relay re-reads its policy, certificates, password and
    key files; on any problem it keeps the old ones and we print its one line. A policy
    that does not even parse is reported here, and the relay is not asked."""
    try:
        cfg = _load(args)
    except ConfigError as err:
        print(f"mta: {err}", file=sys.stderr)
        return EXIT_FAILURE
    answer = control.ask(cfg.control_socket, "reload", timeout=RELOAD_WAIT)
    if answer is None:
        print("mta: relay not running", file=sys.stderr)
        return EXIT_FAILURE
    if not answer.startswith("ok"):
        print(f"mta: {answer.removeprefix('error').strip()}", file=sys.stderr)
        return EXIT_FAILURE
    print(f"reloaded: {answer.removeprefix('ok').strip()}")
    return EXIT_OK


def _reload_keys(cfg: config.Config) -> bool:
    """Tell a running relay to reload its keys; False (and says why) if it refused."""
    answer = control.ask(cfg.control_socket, "reload-keys")
    if answer is None:
        print("relay not running")
    elif answer.startswith("ok"):
        print("running relay reloaded its keys")
    else:
        print(f"mta: relay answered: {answer}", file=sys.stderr)
        return False
    return True


def _rewrap(cfg: config.Config) -> bool:
    """Re-seal the spool's records under the active key: the running relay does it (it
    knows which records are being delivered), else we do, holding the spool's lock."""
    answer = control.ask(cfg.control_socket, "rewrap", timeout=REWRAP_WAIT)
    if answer is None:
        if not cfg.spool.path.is_dir():
            print("relay not running; the spool is empty")
            return True
        rewrapped = failed = 0
        keyring = KeyRing.load(cfg.spool.key_file)
        for path in shards.spool_dirs(cfg):  # the root and a relay group's shards
            store = SpoolStore(path, keyring)
            lock = store.lock()  # SpoolError (one line) if a relay has just started
            try:
                done = asyncio.run(store.rewrap())
            finally:
                os.close(lock)
            rewrapped, failed = rewrapped + done.rewrapped, failed + done.failed
        answer = f"ok rewrapped={rewrapped} failed={failed}"
        print("relay not running; re-wrapped in place")
    if not answer.startswith("ok"):
        print(f"mta: relay answered: {answer}", file=sys.stderr)
        return False
    figures = dict(item.split("=", 1) for item in answer.split()[1:])
    print(f"re-wrapped {figures.get('rewrapped', '?')} record(s) under the active key")
    if figures.get("failed", "0") != "0":
        print(
            f"mta: {figures['failed']} record(s) did not open and were left as they are "
            "(their messages are quarantined when next read)",
            file=sys.stderr,
        )
        return False
    return True


def cmd_keys(args: argparse.Namespace) -> int:
    cfg = _load(args)
    if args.action == "shared-create":
        return _create_fleet_key(cfg)
    keyring = KeyRing.load(cfg.spool.key_file)
    # The root and a relay group's shards: each has its records and key checks.
    spools = [SpoolDirectory(path) for path in shards.spool_dirs(cfg)]
    if args.action == "rotate":
        # The start-up rule first: a key file that has lost a key the spool needs is
        # not built on (``mta keys prune`` is the only way to drop a key).
        for spool in spools:
            verdict = keycheck.assess(keyring.path, keyring.ids(), keyring.get, spool)
            if verdict.refusal is not None:
                print(f"mta: {verdict.refusal} (not rotated; restore it)", file=sys.stderr)
                return EXIT_FAILURE
        new_id = keyring.rotate()
        for spool in spools:
            keycheck.write_checks(spool, [new_id], keyring.get)
        print(f"new active key {new_id} in {cfg.spool.key_file}")
        if not _reload_keys(cfg):
            return EXIT_FAILURE
    wants_rewrap = args.action == "rewrap" or (args.action == "rotate" and args.rewrap)
    if wants_rewrap and not _rewrap(cfg):
        return EXIT_FAILURE
    references = key_usage(cfg)
    # Receipts are never re-sealed (their MACs chain the sealed bytes): a key stays
    # until the last receipt file sealed under it has expired.
    receipts = receipt_log.key_references(receipt_log.receipt_dirs(cfg))
    if args.action == "prune":
        dropped = keyring.prune(set(references) | set(receipts))
        for key_id in dropped:
            for spool in spools:
                keycheck.remove_check(spool, key_id)
        print(f"dropped {len(dropped)} unreferenced key(s): {' '.join(dropped) or '-'}")
        if dropped and not _reload_keys(cfg):
            return EXIT_FAILURE
    for key_id in keyring.ids():
        state = "active" if key_id == keyring.active_id else "old"
        print(
            f"{key_id}  {state:<6}  {references.get(key_id, 0)} spool record(s), "
            f"{receipts.get(key_id, 0)} receipt(s)"
        )
    return EXIT_OK


def _create_fleet_key(cfg: config.Config) -> int:
    """``mta keys shared-create``: the fleet key of ``[shared] key_file``, once."""
    path = cfg.shared.key_file
    if path is None:
        print(f"mta: {cfg.source}: shared.key_file: not set", file=sys.stderr)
        return EXIT_FAILURE
    try:
        fleet_key.create(path)
    except FileExistsError:
        print(f"mta: {path}: exists; copy it to every relay (never made anew)", file=sys.stderr)
        return EXIT_FAILURE
    print(f"new fleet key in {path} (mode 0600); copy it to every relay of the fleet")
    return EXIT_OK


def cmd_passwd(args: argparse.Namespace) -> int:
    cfg = _load(args)
    path = Path(args.file) if args.file else cfg.auth.password_file
    if path is None:
        raise ConfigError(cfg.source, "auth.password_file", "not set; give --file or set it")
    if sys.stdin.isatty():
        password = getpass.getpass(f"password for {args.user}: ")
    else:
        password = sys.stdin.readline().rstrip("\r\n")
    if not password:
        print("mta: empty password refused", file=sys.stderr)
        return EXIT_CONFIG
    add_user(path, args.user, password)
    print(f"{args.user}: password set in {path}")
    return EXIT_OK


def _check_config(args: argparse.Namespace) -> config.Config:
    """The policy with the command line's overrides (resolver, CA file, port)."""
    cfg = _load(args)
    if args.resolver:
        try:
            resolver = config.parse_resolver(args.resolver)
        except ValueError as err:
            raise ConfigError("--resolver", "dns.resolvers", str(err)) from None
        cfg = replace(cfg, dns=replace(cfg.dns, resolvers=(resolver,)))
    if args.ca_file:
        cfg = replace(cfg, tls=replace(cfg.tls, ca_file=Path(args.ca_file).absolute()))
    if args.port:
        cfg = replace(cfg, outbound=replace(cfg.outbound, port=args.port))
    return cfg


def cmd_check(args: argparse.Namespace) -> int:
    from mta import app, check  # imported here: they pull in the network stack

    cfg = _check_config(args)
    setup_logging("ERROR" if args.json else "WARNING", cfg.log.format)

    async def run() -> check.Report:
        shared = _open_shared(cfg, app.hostname_of(cfg))
        try:
            destinations = app.build_destinations(cfg, SystemClock(), shared=shared)
            return await check.check_domain(
                cfg, destinations.resolver, args.domain, connect=args.connect
            )
        finally:
            if shared is not None:
                await shared.store.close()

    report = asyncio.run(run())
    print(json.dumps(report.doc, indent=2) if args.json else check.render_text(report))
    return EXIT_OK


def _open_shared(cfg: config.Config, hostname: str) -> SharedState | None:
    """The fleet's state for ``mta check`` (its MTA-STS view is the fleet's); a fleet
    key this user cannot read leaves it to the local cache, with a warning."""
    try:
        return open_shared(cfg, hostname)
    except ConfigError as err:
        print(f"mta: {err} (checking with the local MTA-STS cache only)", file=sys.stderr)
        return None


def cmd_policy_server(args: argparse.Namespace) -> int:
    from mta.postfix import server  # imported here: it pulls in the network stack

    cfg = _load(args)
    setup_logging(cfg.log.level, cfg.log.format)
    asyncio.run(server.serve(cfg))
    return EXIT_OK


def cmd_policy_validate(args: argparse.Namespace) -> int:
    status = EXIT_OK
    for name in args.files:
        try:
            config.load(Path(name))
        except ConfigError as err:
            print(f"mta: {err}", file=sys.stderr)
            status = EXIT_CONFIG
        else:
            print(f"{name}: ok")
    return status


def cmd_tlsrpt(args: argparse.Namespace) -> int:
    from mta.report import tlsrpt_cli

    cfg = _load(args)
    if args.action == "send":
        return tlsrpt_cli.send(cfg, args.date or "")
    return tlsrpt_cli.show(cfg, args.date or "", args.json)


def cmd_receipts(args: argparse.Namespace) -> int:
    from mta.report import receipts_cli

    cfg = _load(args)
    if args.action == "verify":
        return receipts_cli.check(cfg)
    return receipts_cli.show(cfg, args.qid, as_json=args.json)


def cmd_report(args: argparse.Namespace) -> int:
    from mta.report import transparency_cli  # imported here: it pulls in matplotlib

    return transparency_cli.run(_load(args), args.days, Path(args.out) if args.out else None)


def _days(text: str) -> int:
    if not text.isdigit() or not 1 <= int(text) <= 366:
        raise argparse.ArgumentTypeError(f"expected 1 to 366, got {text!r}")
    return int(text)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mta", description="Mail transport security relay.")
    parser.add_argument("--version", action="version", version=f"mta {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    def with_config(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
        p.add_argument("--config", metavar="FILE", help="policy file (default: the embedded one)")
        return p

    run = with_config(sub.add_parser("run", help="run the relay"))
    run.add_argument(
        "--allow-root",
        action="store_true",
        help="run on as root without [server] user (a trial on loopback; never in production)",
    )
    run.set_defaults(func=cmd_run)
    worker = with_config(sub.add_parser("worker", help="(started by mta run) one relay of a group"))
    worker.add_argument("--shard", type=int, required=True)
    worker.add_argument("--channel", type=int, required=True, metavar="FD")
    worker.add_argument("--allow-root", action="store_true")
    worker.set_defaults(func=cmd_worker)

    queue = sub.add_parser(
        "queue", help="inspect, flush, hold, release, delete or requeue"
    ).add_subparsers(dest="action", required=True)
    qlist = with_config(queue.add_parser("list", help="list queued messages (like mailq)"))
    qlist.add_argument("--json", action="store_true", help="one JSON document")
    qlist.set_defaults(func=cmd_queue_list)
    qflush = with_config(queue.add_parser("flush", help="retry every queued message now"))
    qflush.set_defaults(func=cmd_queue_flush)
    qshow = with_config(queue.add_parser("show", help="one message: envelope, state, headers"))
    qshow.add_argument("qid")
    qshow.add_argument("--json", action="store_true", help="one JSON document")
    qshow.add_argument("--body", action="store_true", help="the body too (decrypted; logged)")
    qshow.set_defaults(func=cmd_queue_show)
    for action, text in (
        (Action.HOLD, "put messages on hold: never attempted, never expired (postsuper -h)"),
        (Action.RELEASE, "release held messages, due now (postsuper -H)"),
        (Action.DELETE, "delete messages without a DSN (postsuper -d)"),
        (Action.REQUEUE, "retry messages now, backoff forgotten (postsuper -r)"),
    ):
        qchange = with_config(queue.add_parser(action.value, help=text))
        qchange.add_argument("qids", nargs="*", metavar="QID")
        if action is not Action.DELETE:
            qchange.add_argument("--all", action="store_true", help="every queued message")
        qchange.add_argument("--domain", metavar="D", help="messages with recipients in D")
        qchange.set_defaults(func=cmd_queue_change)

    stats = with_config(
        sub.add_parser("stats", help="queue and process figures of the running relay")
    )
    stats.set_defaults(func=cmd_stats)

    reload = with_config(
        sub.add_parser("reload", help="re-read policy, certificates, passwords, keys (SIGHUP)")
    )
    reload.set_defaults(func=cmd_reload)

    keys = with_config(sub.add_parser("keys", help="spool key management"))
    keys.add_argument("action", choices=["list", "rotate", "rewrap", "prune", "shared-create"])
    keys.add_argument(
        "--rewrap", action="store_true", help="rotate: then re-seal older records under the new key"
    )
    keys.set_defaults(func=cmd_keys)

    passwd = with_config(sub.add_parser("passwd", help="add or change an AUTH user"))
    passwd.add_argument("user")
    passwd.add_argument("--file", help="password file (default: auth.password_file)")
    passwd.set_defaults(func=cmd_passwd)

    chk = with_config(sub.add_parser("check", help="what will happen to mail for a domain"))
    chk.add_argument("domain")
    chk.add_argument("--resolver", metavar="IP[:PORT]", help="DNS resolver (default: the policy's)")
    chk.add_argument("--ca-file", metavar="PEM", help="extra trust anchors (default: tls.ca_file)")
    chk.add_argument("--port", type=int, help="SMTP port for MX hosts (default: outbound.port)")
    chk.add_argument("--connect", action="store_true", help="connect, STARTTLS and verify each MX")
    chk.add_argument("--json", action="store_true", help="one JSON object")
    chk.set_defaults(func=cmd_check)

    psrv = with_config(
        sub.add_parser("policy-server", help="serve our TLS policy to Postfix (socketmap)")
    )
    psrv.set_defaults(func=cmd_policy_server)

    from mta.report.tlsrpt_cli import date_arg

    tlsrpt = sub.add_parser("tlsrpt", help="TLS reports (RFC 8460) of the running relay")
    tlsrpt_actions = tlsrpt.add_subparsers(dest="action", required=True)
    rpt_show = with_config(
        tlsrpt_actions.add_parser("show", help="a day's reports as they stand, per domain")
    )
    rpt_show.add_argument("--json", action="store_true", help="one JSON document")
    rpt_send = with_config(
        tlsrpt_actions.add_parser("send", help="send a day's reports now, and mark them sent")
    )
    for rpt in (rpt_show, rpt_send):
        rpt.add_argument(
            "--date", type=date_arg, metavar="YYYY-MM-DD", help="the UTC day (default: today)"
        )
        rpt.set_defaults(func=cmd_tlsrpt)

    receipts = sub.add_parser("receipts", help="transport receipts: one message's story, the chain")
    receipts_actions = receipts.add_subparsers(dest="action", required=True)
    rcpt_show = with_config(
        receipts_actions.add_parser("show", help="every event of one message, attempt by attempt")
    )
    rcpt_show.add_argument("qid")
    rcpt_show.add_argument("--json", action="store_true", help="one JSON document")
    rcpt_verify = with_config(
        receipts_actions.add_parser("verify", help="check the chain: exit 1 at the first bad entry")
    )
    for rcpt in (rcpt_show, rcpt_verify):
        rcpt.set_defaults(func=cmd_receipts)

    report = with_config(
        sub.add_parser("report", help="the transparency report: how mail was protected (HTML)")
    )
    report.add_argument("--days", type=_days, default=7, help="UTC days up to today (default 7)")
    report.add_argument("--out", metavar="FILE.html", help="write it here (default: stdout)")
    report.set_defaults(func=cmd_report)

    policy = sub.add_parser("policy", help="policy files").add_subparsers(
        dest="action", required=True
    )
    validate = policy.add_parser("validate", help="check policy files without starting anything")
    validate.add_argument("files", nargs="+", metavar="FILE")
    validate.set_defaults(func=cmd_policy_validate)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        status: int = args.func(args)
    except ConfigError as err:
        print(f"mta: {err}", file=sys.stderr)
        return EXIT_CONFIG
    except MtaError as err:
        print(f"mta: {err}", file=sys.stderr)
        return EXIT_FAILURE
    except KeyboardInterrupt:
        return EXIT_FAILURE
    return status
