"""Whom the relay runs as: never root unless told, and ``[server] user`` after binding.

Port 25 needs root or ``CAP_NET_BIND_SERVICE``. Started as root with ``server.user``,
the relay binds its listeners (nothing is accepted yet: the sockets are bound, not
listening), gives its own files to that user, then becomes it (its uid, its primary
group, no supplementary groups) and only then opens the spool keys, takes the spool
lock and starts listening, so no connection is ever served as root and every file the
relay writes afterwards is the user's. Started as that user already (systemd's
``User=`` with ``AmbientCapabilities=CAP_NET_BIND_SERVICE``), there is nothing to
drop. As root without ``server.user`` the relay refuses to start unless
``server.allow_root`` says so.

What is handed over (Postfix's ``set-permissions`` for our tree): the spool directory
and everything in it, the key file (and its directory when that is inside the data
directory), the self-signed certificates in ``tls/``, the MTA-STS cache and the data
directory itself when the relay creates it. Ownership changes never follow a symbolic
link. A data directory that already exists is not taken over (``MTA_HOME`` may be
shared); it must be writable by the user, which is checked after the switch.
"""

from __future__ import annotations

import contextlib
import logging
import os
import pwd
import stat
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from mta.config import Config
from mta.errors import ConfigError

log = logging.getLogger(__name__)

Lookup = Callable[[str], pwd.struct_passwd]


@dataclass(frozen=True, slots=True)
class Account:
    """The user the relay becomes."""

    name: str
    uid: int
    gid: int


def root_refusal(config: Config, euid: int) -> ConfigError | None:
    """Why the relay must not run as it was started, or None. Pure."""
    if euid == 0 and not config.server.user and not config.server.allow_root:
        return ConfigError(
            config.source,
            "server.user",
            'refusing to run as root: set user = "mta" (an unprivileged user to switch to '
            "after binding) or allow_root = true in [server]",
        )
    return None


def account_for(config: Config, euid: int, lookup: Lookup = pwd.getpwnam) -> Account | None:
    """The account to switch to, or None when there is nothing to switch.

    Parameters:
        config: ``server.user`` names the account.
        euid: who we are now.
        lookup: ``pwd.getpwnam`` (tests pass a table).
    """
    name = config.server.user
    if not name:
        return None
    try:
        entry = lookup(name)
    except KeyError:
        raise ConfigError(config.source, "server.user", f"no such user: {name}") from None
    if entry.pw_uid == 0:
        raise ConfigError(
            config.source,
            "server.user",
            f"{name} is root (uid 0): name an unprivileged user, or use allow_root = true",
        )
    if entry.pw_uid == euid:
        return None  # started as the user already (systemd User=)
    if euid != 0:
        raise ConfigError(
            config.source,
            "server.user",
            f"cannot switch to {name} (uid {entry.pw_uid}): running as uid {euid}, not root",
        )
    return Account(name, entry.pw_uid, entry.pw_gid)


def hand_over(config: Config, account: Account) -> None:
    """As root: create the relay's directories and give its files to ``account``."""
    home = config.home
    if not home.exists():
        home.mkdir(mode=0o700, parents=True)
        _own(home, account)
    key_dir = config.spool.key_file.parent
    for directory in (config.spool.path, key_dir):
        if not directory.exists():
            directory.mkdir(mode=0o700, parents=True)
            _own(directory, account)
    trees = [config.spool.path, home / "tls"]
    if _inside(key_dir, home):
        trees.append(key_dir)
    for path in _walk(trees):
        _own(path, account)
    for path in (config.spool.key_file, config.mta_sts.cache_file):
        if path.exists() and not path.is_symlink():
            _own(path, account)


def drop(account: Account) -> None:
    """Become ``account`` for good: no supplementary groups, then gid, then uid.

    Checked afterwards: a process that could take root back has not dropped anything.
    """
    os.setgroups([])
    os.setresgid(account.gid, account.gid, account.gid)
    os.setresuid(account.uid, account.uid, account.uid)
    try:
        os.setuid(0)
    except PermissionError:
        pass
    else:  # pragma: no cover - the kernel refuses; this is the check that it did
        raise RuntimeError(f"still able to become root after switching to {account.name}")
    log.info(
        "mta.privileges.dropped",
        extra={"user": account.name, "uid": account.uid, "gid": account.gid},
    )


def check_home(config: Config, account: Account) -> None:
    """After ``drop``: the data directory must be the user's to write in."""
    if not os.access(config.home, os.W_OK | os.X_OK):
        raise ConfigError(
            config.source,
            "server.user",
            f"{config.home}: the data directory is not writable by {account.name} "
            f"(chown {account.name} {config.home}, or set MTA_HOME)",
        )


@contextlib.contextmanager
def acting_as(account: Account | None) -> Iterator[None]:
    """For a while, as root: ``account``'s effective uid and gid (root's real and saved
    ones are kept, to come back). What a relay group's supervisor does to its files: it
    stays root to start its workers (which bind, then ``drop``), like Postfix's master,
    but makes the spool and the key file as the user they belong to."""
    if account is None:
        yield
        return
    os.setegid(account.gid)
    os.seteuid(account.uid)
    try:
        yield
    finally:
        os.seteuid(0)
        os.setegid(0)


def become(config: Config, account: Account) -> None:
    """``hand_over``, ``drop`` and ``check_home``: what ``app.start`` does as root."""
    hand_over(config, account)
    drop(account)
    check_home(config, account)


def _own(path: Path, account: Account) -> None:
    info = os.lstat(path)
    if (info.st_uid, info.st_gid) != (account.uid, account.gid):
        os.chown(path, account.uid, account.gid, follow_symlinks=False)


def _walk(roots: list[Path]) -> Iterator[Path]:
    """Every directory and file under ``roots`` (the roots too), links not followed."""
    for root in roots:
        try:
            info = os.lstat(root)
        except FileNotFoundError:
            continue
        yield root
        if not stat.S_ISDIR(info.st_mode):
            continue
        for directory, dirs, files in os.walk(root, followlinks=False):
            for name in (*dirs, *files):
                yield Path(directory, name)


def _inside(path: Path, home: Path) -> bool:
    return path.absolute().is_relative_to(home.absolute())
