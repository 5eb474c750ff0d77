"""The `sftp` driver: objects are files below a directory on an SSH server, through paramiko.

URL: ``sftp://[USER[:PASSWORD]@]HOST[:PORT]/ABS/PATH[?option=value&...]``. The URL path is
the remote root directory, always absolute (``sftp://host/srv/backup`` is /srv/backup on
the server, ``sftp://host/`` its /), percent-decoded; it is created on the first put. As
elsewhere in replicator the last '@' ends the user-info, so write an '@' in the path as %40.

Options (keyword options from the configuration, or the same names in the query; a value
given both ways must agree): `user` (default: the URL user, else the local user name),
`password` (option or URL user-info only, never in the query; also tried as the passphrase
of an encrypted key file), `key_path` (a private key file: Ed25519, ECDSA or RSA),
`known_hosts_path`, `host_key` (a pinned public key line such as "ssh-ed25519 AAAA..."),
`timeout` (seconds, default 30: connecting, authenticating, and waiting for any answer).
With neither key_path nor password the driver tries, like ssh, the agent's keys and then
~/.ssh/id_ed25519, id_ecdsa and id_rsa.

Host keys are always verified, never learned: against host_key when given, else against
known_hosts_path (default ~/.ssh/known_hosts), where a server on a port other than 22 is
listed as "[HOST]:PORT". An unknown or changed key raises PermissionDenied naming the host
and the key the server offered. (``@revoked`` and ``@cert-authority`` lines are not
supported.)

Layout and guarantees match the file driver: a key's segments are directories; a put
streams to ``.<name>.tmp-<16 hex>`` in the target directory (never listed), fsyncs it
(fsync@openssh.com when the server offers it) and renames it over the key with
posix-rename@openssh.com, so readers see the old object or the new one. ``if_absent``
links the temporary file with hardlink@openssh.com, which fails if the key exists.
Delete prunes directories left empty, up to the root. Symlinks are not objects: list skips
them, head and get report NotFound.

Resume (Capability.MULTIPART): a put cut off by a lost connection reconnects and goes on
writing its temporary file from the bytes the server acknowledged, for bytes data or a
seekable stream (a stream that cannot seek gives up, and the caller restarts the put); if
that fails too the temporary file stays behind, never listed. A get stream cut off the
same way opens the file again and reads on from where it stopped, provided size and mtime
are unchanged, else IntegrityError (SFTP v3 gives mtimes in whole seconds: a rewrite of
the same size within the same second would go unnoticed; replicator never rewrites an
object). Timeouts are not resumed (the server is hung). reset() closes the connection.

One SSH connection per driver carries a small pool of SFTP sessions (channels), one per
concurrent operation, so threads do not wait for each other (OpenSSH's MaxSessions, 10 by
default, bounds the concurrency; an operation beyond it waits up to `timeout` for a free
session). A connection found dead is re-established on the next operation. Reads and
writes are pipelined (many requests in flight, large requests when the server announces
limits@openssh.com) with bounded memory. Socket errors, EOF and timeouts raise Transient.

paramiko's SFTPClient is used for the session handshake and its request plumbing
(`_async_request`, `_read_response`, as its own SFTPFile does), not for its file objects:
those drop the errors of pipelined writes and decode names strictly.

Modules: config (URL and options), hostkeys (verification), auth (user authentication),
connection (one SSH connection), protocol (SFTP requests on a session), pool (the
connection's sessions, error mapping), upload (atomic puts), reader (get streams),
listing (list), driver (SFTPDriver).
"""

from __future__ import annotations

from .config import DEFAULT_PORT, DEFAULT_TIMEOUT
from .connection import KEEPALIVE_SECONDS, _GuardedSocket
from .driver import SFTPDriver, from_url
from .pool import MAX_IDLE_SESSIONS
from .protocol import (
    BASIC_REQUEST_SIZE,
    MAX_PACKET_SIZE,
    MAX_REQUEST_SIZE,
    READ_AHEAD_BYTES,
    WINDOW_SIZE,
    WRITE_BEHIND_BYTES,
)

__all__ = [
    "BASIC_REQUEST_SIZE",
    "DEFAULT_PORT",
    "DEFAULT_TIMEOUT",
    "KEEPALIVE_SECONDS",
    "MAX_IDLE_SESSIONS",
    "MAX_PACKET_SIZE",
    "MAX_REQUEST_SIZE",
    "READ_AHEAD_BYTES",
    "WINDOW_SIZE",
    "WRITE_BEHIND_BYTES",
    "SFTPDriver",
    "_GuardedSocket",
    "from_url",
]
