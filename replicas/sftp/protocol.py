"""SFTP requests on one session, through paramiko's request plumbing.

paramiko's SFTPClient is used for the session handshake and `_async_request` /
`_read_response` (as its own SFTPFile does), not for its file objects: those drop the
errors of pipelined writes and decode names strictly.
"""

from __future__ import annotations

import contextlib
import stat

import paramiko
from paramiko.sftp import CMD_STATUS, SFTP_DESC, SFTP_OK
from paramiko.sftp_attr import SFTPAttributes

WINDOW_SIZE = 16 << 20
"""SSH channel window: how much the server may send before we consume it (bounds memory)."""
MAX_PACKET_SIZE = 256 << 10
"""Largest SSH packet we accept; bigger packets mean fewer to decrypt one by one."""
BASIC_REQUEST_SIZE = 32 << 10
"""Read/write request size every SFTP server accepts."""
MAX_REQUEST_SIZE = 255 << 10
"""Largest read/write request we send when the server's limits allow (OpenSSH: 255 KiB)."""
READ_AHEAD_BYTES = 8 << 20
"""Bytes of read requests kept in flight by a get stream."""
WRITE_BEHIND_BYTES = 8 << 20
"""Bytes of write requests in flight (sent, not yet acknowledged) during a put."""


class Status(Exception):
    """An SFTP status reply other than OK (internal: mapped to StorageError subclasses)."""

    def __init__(self, code: int, text: str) -> None:
        super().__init__(code, text)
        self.code = code
        self.text = text or (SFTP_DESC[code] if 0 <= code < len(SFTP_DESC) else f"status {code}")


class Session:
    """One SFTP session on one SSH channel, used by one thread at a time.

    Requests are sent with paramiko's `_async_request` registering this object as the
    receiver, so a reply read while waiting for another request is kept here, never lost.
    """

    def __init__(self, sftp: paramiko.SFTPClient, transport: paramiko.Transport) -> None:
        self.sftp = sftp
        self.transport = transport
        self.replies: dict[int, tuple[int, paramiko.Message]] = {}
        self.broken = False
        self.read_size = BASIC_REQUEST_SIZE
        self.write_size = BASIC_REQUEST_SIZE

    def _async_response(self, t: int, msg: paramiko.Message, num: int) -> None:  # called by paramiko
        self.replies[num] = (t, msg)

    def send(self, t: int, *args: object) -> int:
        return self.sftp._async_request(self, t, *args)

    def send_forget(self, t: int, *args: object) -> None:
        """Send a request whose reply is discarded when it arrives."""
        self.sftp._async_request(type(None), t, *args)

    def wait(self, num: int) -> tuple[int, paramiko.Message | None]:
        """The reply to request num; raises Status for an error status."""
        replies = self.replies
        while num not in replies:
            self.sftp._read_response()  # one packet, handed to whoever sent its request
        t, msg = replies.pop(num)
        if t == CMD_STATUS:
            code = msg.get_int()
            if code != SFTP_OK:
                raise Status(code, msg.get_string().decode("utf-8", "replace"))
            return t, None
        return t, msg

    def call(self, t: int, *args: object) -> tuple[int, paramiko.Message | None]:
        return self.wait(self.send(t, *args))

    def usable(self) -> bool:
        return not self.broken and not self.sftp.sock.closed and self.transport.is_active()

    def close(self) -> None:
        self.broken = True
        with contextlib.suppress(Exception):
            self.sftp.close()


def is_file(attrs: SFTPAttributes | None) -> bool:
    return attrs is not None and attrs.st_mode is not None and stat.S_ISREG(attrs.st_mode)
