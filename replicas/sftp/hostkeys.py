"""Host key verification: always against a pinned key or known_hosts, never learned.

An unknown or changed key is PermissionDenied naming the host and the key the server
offered, so that an operator can compare fingerprints by hand.
"""

from __future__ import annotations

import base64
import hashlib
import os

import paramiko

from ..errors import PermissionDenied
from .config import describe


def expected_host_keys(
    url: str, host_id: str, host_key: paramiko.PKey | None, known_hosts_path: str | None
) -> tuple[list[paramiko.PKey], str]:
    """The keys the server may present, and where they come from (for messages)."""
    if host_key is not None:
        return [host_key], "the pinned host_key"
    path = known_hosts_path or os.path.expanduser("~/.ssh/known_hosts")
    known = paramiko.HostKeys()
    try:
        known.load(path)
    except FileNotFoundError:
        raise PermissionDenied(f"{url}: cannot verify the host key of {host_id}: {path} does not exist") from None
    except OSError as exc:
        raise PermissionDenied(f"{url}: cannot read {path}: {describe(exc)}") from exc
    except Exception as exc:  # a malformed line (paramiko's InvalidHostKey and friends)
        raise PermissionDenied(f"{url}: {path} is not a valid known_hosts file: {describe(exc)}") from exc
    entry = known.lookup(host_id)
    return (list(entry.values()) if entry is not None else []), path


def verify_host_key(
    url: str, host_id: str, transport: paramiko.Transport, expected: list[paramiko.PKey], source: str
) -> None:
    """Raise PermissionDenied unless the server's key is one of expected."""
    offered = transport.get_remote_server_key()
    for key in expected:
        if key.get_name() == offered.get_name() and key.asbytes() == offered.asbytes():
            return
    shown = f"{offered.get_name()} {fingerprint(offered)}"
    if not expected:
        raise PermissionDenied(
            f"{url}: host key for {host_id} is not in {source} (the server offered {shown}); refusing to connect"
        )
    raise PermissionDenied(
        f"{url}: host key for {host_id} does not match {source} (the server offered {shown}); refusing to connect"
    )


def prefer_key_types(transport: paramiko.Transport, expected: list[paramiko.PKey]) -> None:
    """Ask first for the host key types we can verify (as ssh does with known_hosts)."""
    wanted: list[str] = []
    for key in expected:
        name = key.get_name()
        wanted += ["rsa-sha2-512", "rsa-sha2-256"] if name == "ssh-rsa" else [name]
    options = transport.get_security_options()
    available = list(options.key_types)
    first = [name for name in dict.fromkeys(wanted) if name in available]
    if first:
        options.key_types = first + [name for name in available if name not in first]


def fingerprint(key: paramiko.PKey) -> str:
    digest = hashlib.sha256(key.asbytes()).digest()
    return "SHA256:" + base64.b64encode(digest).decode().rstrip("=")
