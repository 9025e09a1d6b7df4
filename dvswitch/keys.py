"""A cluster's CURVE keys: one key pair per host, the controller's, and the admin's (`dvs`).

One directory (STATE_DIR/keys, mode 0700) in pyzmq's certificate format (zmq.auth): `NAME.key`
holds a public key, `NAME.key_secret` the pair (mode 0600). The file name says whose key it is:
`admin`, `controller`, or a host id. A rotation (`dvs keys rotate`, Serf's install / use /
remove) adds `NAME.next.key` beside the current one, renames the current to `NAME.old.key` and
the next to `NAME.key` when the owner switches, and finally removes the old one: every key in
the directory is accepted, the one without a suffix is the one its owner uses and its peers pin.

Roles, which the ZAP handler hands to the socket as the connection's User-Id: `admin`,
`controller`, `host:NAME`.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path

import zmq.auth
from zmq.utils import z85

ADMIN = "admin"
CONTROLLER = "controller"
HOST_PREFIX = "host:"
STAGES = ("next", "old")  # suffixes of a key being rotated in or out
RESCAN_AFTER_CHANGE_NS = 2_000_000_000  # see KeyRing.maybe_reload
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,62}$")


def role_of(name: str) -> str:
    """The role a key file's owner has: `admin`, `controller` or `host:NAME`."""
    return name if name in (ADMIN, CONTROLLER) else HOST_PREFIX + name


def host_of_role(role: str | None) -> str | None:
    return role[len(HOST_PREFIX):] if role is not None and role.startswith(HOST_PREFIX) else None


def fingerprint(public_z85: bytes) -> str:
    """A short, stable name for a public key: the first 16 hex digits of SHA-256 over its 32 bytes."""
    return hashlib.sha256(z85.decode(public_z85)).hexdigest()[:16]


def _split(stem: str) -> tuple[str, str]:
    """"h3.next" -> ("h3", "next"); "h3" -> ("h3", "")."""
    name, _, stage = stem.partition(".")
    return name, stage


@dataclass(frozen=True)
class KeyPair:
    public: bytes  # Z85, 40 bytes, as the CURVE socket options take it
    secret: bytes


def create(key_dir: Path, name: str, stage: str = "") -> KeyPair:
    """A fresh key pair for `name` in `key_dir` (created 0700), secret file 0600. Returns it."""
    if not _NAME_RE.match(name):
        raise ValueError(f"{name!r} cannot name a key: use letters, digits, '-' or '_'")
    key_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(key_dir, 0o700)
    stem = f"{name}.{stage}" if stage else name
    old = os.umask(0o077)  # the secret file is never readable by others, not even for an instant
    try:
        pub_file, secret_file = zmq.auth.create_certificates(key_dir, stem)
    finally:
        os.umask(old)
    os.chmod(pub_file, 0o644)
    os.chmod(secret_file, 0o600)
    public, secret = zmq.auth.load_certificate(secret_file)
    return KeyPair(public, secret)


def ensure(key_dir: Path, names: list[str]) -> None:
    """Create the key pairs of `names` that `key_dir` does not hold yet."""
    for name in names:
        if not (key_dir / f"{name}.key_secret").exists():
            create(key_dir, name)


def load_pair(key_dir: Path, name: str) -> KeyPair:
    """`name`'s own key pair; ValueError with a one-line reason if it cannot be read."""
    path = key_dir / f"{name}.key_secret"
    try:
        public, secret = zmq.auth.load_certificate(path)
    except (OSError, ValueError) as e:
        raise ValueError(f"cannot read the secret key {path}: {getattr(e, 'strerror', None) or e}") from None
    if secret is None:
        raise ValueError(f"{path} holds no secret key")
    return KeyPair(public, secret)


@dataclass(frozen=True)
class KeyInfo:
    name: str
    stage: str  # "" (in use), "next" (installed, not yet used), "old" (retiring)
    public: bytes
    path: Path

    @property
    def role(self) -> str:
        return role_of(self.name)

    @property
    def fingerprint(self) -> str:
        return fingerprint(self.public)


def scan(key_dir: Path) -> list[KeyInfo]:
    out = []
    for path in sorted(key_dir.glob("*.key")):
        name, stage = _split(path.name[: -len(".key")])
        if not _NAME_RE.match(name) or (stage and stage not in STAGES):
            continue
        try:
            public, _ = zmq.auth.load_certificate(path)
        except (OSError, ValueError):
            continue  # half-written or foreign: not a key of ours
        if public and len(public) == 40:
            out.append(KeyInfo(name, stage, public, path))
    return out


class KeyRing:
    """The public keys a process accepts (every key in the directory) and pins (each owner's
    current one), re-read when the directory changes: a rename or a new file changes its mtime,
    so a check costs one stat()."""

    def __init__(self, key_dir: str | Path) -> None:
        self.dir = Path(key_dir)
        self.roles: dict[bytes, str] = {}  # accepted public key (Z85) -> role
        self.current: dict[str, bytes] = {}  # owner name -> the public key it uses
        self._mtime_ns = -1
        self.reloads = 0
        if not self.dir.is_dir():
            raise ValueError(f"key directory {self.dir} does not exist")
        self.maybe_reload()

    def maybe_reload(self) -> bool:
        """Re-read the directory if it changed; True if what we accept or pin changed."""
        try:
            mtime = self.dir.stat().st_mtime_ns
        except OSError:
            return False  # keep what we have: a directory gone for a moment must not lock everyone out
        # Directory times tick coarsely (a few ms): two changes within one tick leave one mtime,
        # so for a while after a change the files are read again even when the mtime is the same.
        if mtime == self._mtime_ns and time.time_ns() - mtime > RESCAN_AFTER_CHANGE_NS:
            return False
        self._mtime_ns = mtime
        keys = scan(self.dir)
        roles = {k.public: k.role for k in keys}
        current = {k.name: k.public for k in keys if not k.stage}
        if roles == self.roles and current == self.current:
            return False
        self.roles, self.current = roles, current
        self.reloads += 1
        return True

    def role(self, public: bytes) -> str | None:
        return self.roles.get(public)

    def digest(self) -> str:
        """Which keys this process accepts, in 16 hex digits: equal everywhere once all have
        re-read the directory (`dvs keys rotate` waits for that between its steps)."""
        h = hashlib.sha256()
        for k in sorted(self.roles):
            h.update(k)
        return h.hexdigest()[:16]


def key_dir_of(state_dir: Path) -> Path:
    return state_dir / "keys"


def remove(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
