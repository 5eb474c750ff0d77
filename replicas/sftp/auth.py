"""SSH user authentication: a key file, a password, else what ssh would try (agent, ~/.ssh/id_*).

The password (also a key file's passphrase) never appears in a message: failures name what
was tried, not with what.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import paramiko

from ..errors import PermissionDenied, StorageError
from .config import describe

_DEFAULT_KEY_FILES = ("id_ed25519", "id_ecdsa", "id_rsa")


def authenticate(
    transport: paramiko.Transport,
    *,
    url: str,
    host_id: str,
    user: str,
    key_path: str | None,
    password: str | None,
) -> None:
    """Authenticate transport as user, or raise PermissionDenied listing what was tried."""
    tried: list[str] = []
    attempts: list[tuple[str, Callable[[], object]]] = []
    if key_path is not None:
        pkey = load_key(key_path, password, url)
        attempts.append((f"key {key_path}", lambda: transport.auth_publickey(user, pkey)))
    if password is not None:
        attempts.append(("password", lambda: transport.auth_password(user, password)))
    agent = None
    if key_path is None and password is None:
        agent, defaults = default_keys()
        for label, key in defaults:
            attempts.append((label, lambda key=key: transport.auth_publickey(user, key)))
    try:
        for label, attempt in attempts:
            tried.append(label)
            try:
                attempt()
            except paramiko.BadAuthenticationType as exc:
                tried[-1] += f" (server allows only {', '.join(exc.allowed_types)})"
                continue
            except paramiko.AuthenticationException:
                continue
            if transport.is_authenticated():
                return
    finally:
        if agent is not None:
            agent.close()
    if not tried:
        tried = ["nothing: no key_path or password given, no agent and no ~/.ssh/id_* key"]
    raise PermissionDenied(f"{url}: authentication as {user!r} to {host_id} failed (tried {', '.join(tried)})")


def load_key(path: str, password: str | None, url: str) -> paramiko.PKey:
    """The private key in path, decrypted with password when it is encrypted."""
    try:
        try:
            return paramiko.PKey.from_path(path)
        except paramiko.PasswordRequiredException:
            if password is None:
                raise PermissionDenied(
                    f"{url}: key {path} is encrypted; give its passphrase as the password option"
                ) from None
            return paramiko.PKey.from_path(path, password)
    except StorageError:
        raise
    except OSError as exc:
        raise PermissionDenied(f"{url}: cannot read key {path}: {describe(exc)}") from exc
    except Exception as exc:  # wrong passphrase, not a key, an unsupported type
        raise PermissionDenied(f"{url}: cannot load key {path}: {type(exc).__name__}") from exc


def default_keys() -> tuple[paramiko.Agent | None, list[tuple[str, paramiko.PKey]]]:
    """The SSH agent's keys, then unencrypted ~/.ssh/id_* keys (what ssh would try)."""
    keys: list[tuple[str, paramiko.PKey]] = []
    agent = None
    if os.environ.get("SSH_AUTH_SOCK"):
        try:
            agent = paramiko.Agent()
            keys += [(f"agent key {key.get_name()}", key) for key in agent.get_keys()]
        except Exception:  # noqa: BLE001 - no usable agent: go on without
            agent = None
    for name in _DEFAULT_KEY_FILES:
        path = os.path.expanduser(f"~/.ssh/{name}")
        if os.path.exists(path):
            try:
                keys.append((f"key {path}", paramiko.PKey.from_path(path)))
            except Exception:  # noqa: BLE001, S112 - encrypted or unreadable: ssh would ask; we cannot
                continue
    return agent, keys
