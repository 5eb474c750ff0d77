"""Reading nkey seed files and .creds files (decentralised JWT authentication), boundedly.

Used twice: when the driver is opened (a malformed file is then BadURL), and by the
connection's own nats-py callbacks at every (re)connect, so a file changed later is read
anew. Every message names the option and the file, never the file's contents; nothing
here chains the exceptions of the parsers (whose texts could quote what they parsed).
"""

from __future__ import annotations

import base64
import re
from typing import Any

MAX_FILE_BYTES = 64 * 1024
"""A seed file is ~60 bytes and a .creds file ~2 KiB; anything larger is not one."""

_JWT_BEGIN = re.compile(rb"-{3,}\s*BEGIN NATS USER JWT\s*-{3,}")
_SEED_BEGIN = re.compile(rb"-{3,}\s*BEGIN USER NKEY SEED\s*-{3,}")
_JWT = re.compile(rb"[\w\-.=]+")  # base64url parts joined by dots, as nats.go's creds parser accepts


class CredentialError(Exception):
    """A credential file that cannot be used; the one-line message never quotes its contents."""


def check_nkey_file(path: str) -> None:
    """Raise CredentialError unless path holds one valid nkey seed."""
    seed_keypair(read_file(path, "nkey_path"), "nkey_path", path).wipe()


def check_creds_file(path: str) -> None:
    """Raise CredentialError unless path is a .creds file with a user JWT and a valid seed."""
    data = read_file(path, "creds_path")
    user_jwt(data, path)
    creds_keypair(data, path).wipe()


def read_file(path: str, option: str) -> bytes:
    """The file's bytes (at most MAX_FILE_BYTES), or CredentialError."""
    reason = None
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_FILE_BYTES + 1)
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
    if reason is not None:
        raise CredentialError(f"cannot read {option} file {path!r}: {reason}")
    if len(data) > MAX_FILE_BYTES:
        raise CredentialError(f"{option} file {path!r} is too large to be a credential file")
    return data


def seed_keypair(raw: bytes, option: str, path: str, where: str = "") -> Any:
    """The nkeys KeyPair of a seed (surrounding whitespace ignored), or CredentialError."""
    import nkeys

    try:
        keypair = nkeys.from_seed(bytearray(raw.strip()))
    except Exception:  # noqa: BLE001 (nkeys.NkeysError, or nacl's for a seed of the wrong length)
        keypair = None
    if keypair is None:
        raise CredentialError(f"{option} file {path!r} does not hold a valid nkey seed{where}")
    return keypair


def user_jwt(data: bytes, path: str) -> bytes:
    """The user JWT of a .creds file: the line after its BEGIN NATS USER JWT line."""
    following = _after(data, _JWT_BEGIN)
    if following is None:
        raise CredentialError(f"creds_path file {path!r} has no '-----BEGIN NATS USER JWT-----' block")
    if not _JWT.fullmatch(following):
        raise CredentialError(f"creds_path file {path!r} has no user JWT after its BEGIN NATS USER JWT line")
    return following


def creds_keypair(data: bytes, path: str) -> Any:
    """The nkeys KeyPair of a .creds file's seed: the line after its BEGIN USER NKEY SEED line."""
    following = _after(data, _SEED_BEGIN)
    if following is None:
        raise CredentialError(f"creds_path file {path!r} has no '-----BEGIN USER NKEY SEED-----' block")
    return seed_keypair(following, "creds_path", path, " after its BEGIN USER NKEY SEED line")


def sign(keypair: Any, nonce: str) -> bytes:
    """The server's nonce signed by keypair, base64-encoded as the CONNECT protocol wants it."""
    try:
        return base64.b64encode(keypair.sign(nonce.encode()))
    finally:
        keypair.wipe()


def _after(data: bytes, begin: re.Pattern[bytes]) -> bytes | None:
    """The stripped line following the first line that is the begin marker; None without one."""
    lines = data.splitlines()
    for number, line in enumerate(lines):
        if begin.fullmatch(line.strip()):
            return lines[number + 1].strip() if number + 1 < len(lines) else b""
    return None
