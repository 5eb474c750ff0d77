"""The connection to the NATS servers and the opened object store bucket, on the loop thread.

nats-py reconnects by itself; a connection that was closed (by close() or reset()) is made
again by the next operation. When TLS is required it is never downgraded: credentials are
withheld from a server that did not negotiate TLS. A .creds file is read (anew at each
connect, boundedly) by the driver's own nats-py callbacks, not by nats-py's reader, which
loops forever on a file without a JWT block; a credential file that went bad since the
driver was opened is PermissionDenied.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
import time
from collections.abc import Callable
from typing import Any

import nats
import nats.errors
import nats.js.errors
from nats.js import api as js_api

from ..errors import BadURL, NotFound, PermissionDenied, StorageError, Transient
from . import credentials
from .config import Settings
from .errors import ERR_STREAM_NAME_IN_USE, describe

log = logging.getLogger("replicas.nats")


class _PlaintextRefused(nats.errors.Error):  # type: ignore[misc]
    """TLS was required but the server did not negotiate it; credentials were withheld.

    A nats-py error, so nats-py treats it as a failed connection attempt (and reports it).
    """


class _CredentialsUnusable(nats.errors.InvalidUserCredentialsError):  # type: ignore[misc]
    """The .creds file cannot be used (changed since the driver was opened); says why, not what it holds.

    A nats-py error, so nats-py treats it as a failed connection attempt (and reports it).
    """

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else "nats: invalid user credentials"


_CREDENTIAL_ERRORS: tuple[type[BaseException], ...] = (
    nats.errors.AuthorizationError,
    nats.errors.InvalidUserCredentialsError,
)
try:
    import nkeys as _nkeys

    _CREDENTIAL_ERRORS += (_nkeys.NkeysError,)
except ImportError:  # pragma: no cover (then nkey_path and creds_path are refused when opened)
    pass


class Connection:
    """The nats-py client and JetStream context of one driver (touched only on the loop thread)."""

    def __init__(self, settings: Settings, url: str) -> None:
        self.settings = settings
        self.url = url
        self.bucket = settings.bucket
        self.stream = f"OBJ_{settings.bucket}"
        self.timeout = settings.timeout
        self._secrets = [s for s in (settings.password, settings.token) if s]
        self.ssl = self._ssl_context()
        self.nc: Any = None
        self.js: Any = None
        self.ready = False
        self.direct = False
        self.denied: tuple[float, str] | None = None  # last permissions violation
        self.closing = False  # set by the driver's close(): a disconnect is then expected
        self._connect_lock: asyncio.Lock | None = None

    def scrub(self, text: str) -> str:
        for secret in self._secrets:
            text = text.replace(secret, "***")
        return text

    async def session(self) -> Any:
        """The JetStream context, connecting and opening the bucket first if need be."""
        if self.ready and self.nc is not None and not self.nc.is_closed:
            return self.js
        if self._connect_lock is None:
            self._connect_lock = asyncio.Lock()
        async with self._connect_lock:
            if self.nc is None or self.nc.is_closed:
                self.nc = await self._connect()
                self.js = self.nc.jetstream(timeout=self.timeout)
                self.ready = False
            if not self.ready:
                await self._open_bucket()
                self.ready = True
        return self.js

    async def reset(self) -> None:
        """Close the connection now (not drained); the next session() connects anew meanwhile."""
        nc, self.nc, self.ready = self.nc, None, False  # js stays: calls on it fail as closed
        if nc is not None and not nc.is_closed:
            await close_quietly(nc)

    async def drain(self) -> None:
        """Drain the connection (bounded by the timeout), else close it."""
        nc = self.nc
        if nc is None or nc.is_closed:
            return
        if nc.is_connected:
            try:
                await asyncio.wait_for(nc.drain(), self.timeout)
                return
            except Exception as exc:  # noqa: BLE001 (closing anyway)
                log.debug("%s: drain failed: %s", self.url, self.scrub(describe(exc)))
        await close_quietly(nc)

    async def _connect(self) -> Any:
        nc = nats.NATS()
        fatal: list[BaseException] = []
        established: list[bool] = []  # non-empty once the first connection is up
        failed = asyncio.Event()
        last: list[BaseException] = []

        async def on_error(exc: Exception) -> None:
            text = self.scrub(describe(exc))
            last[:] = [exc]
            if nc.is_connected and "permissions violation" in text.lower():
                self.denied = (time.monotonic(), text)
                log.warning("%s: %s", self.url, text)
            elif isinstance(exc, (*_CREDENTIAL_ERRORS, ssl.SSLCertVerificationError, _PlaintextRefused)) or (
                "authorization violation" in text.lower()
            ):
                if not nc.is_connected:
                    fatal[:] = [exc]
                    failed.set()
                    if established and isinstance(exc, _CredentialsUnusable):  # nats-py reconnecting, in vain
                        self.denied = (time.monotonic(), f"cannot log in: {exc}")
                log.warning("%s: %s", self.url, text)
            else:
                log.debug("%s: nats: %s", self.url, text)

        async def on_disconnect() -> None:
            if established and not self.closing:
                log.warning("%s: disconnected from the NATS server; reconnecting", self.url)

        async def on_reconnect() -> None:
            log.info("%s: reconnected to the NATS server", self.url)

        auth: dict[str, Any] = {}
        if self.settings.username is not None:
            auth["user"] = self.settings.username
            auth["password"] = self._guarded(nc, self.settings.password or "")
        if self.settings.token is not None:
            auth["token"] = self._guarded(nc, self.settings.token)
        if self.settings.creds_path:  # not user_credentials=: nats-py's reader can loop forever on a bad file
            auth["user_jwt_cb"], auth["signature_cb"] = self._creds_callbacks(nc, self.settings.creds_path)
        elif self.settings.nkey_path:  # (both: the .creds file wins, as in nats-py)
            auth["nkeys_seed"] = self.settings.nkey_path
        scheme = "tls" if self.settings.tls else "nats"
        connecting = asyncio.ensure_future(
            nc.connect(
                servers=[f"{scheme}://{server}" for server in self.settings.servers],
                name="replicator",
                error_cb=on_error,
                disconnected_cb=on_disconnect,
                reconnected_cb=on_reconnect,
                allow_reconnect=True,
                max_reconnect_attempts=-1,
                reconnect_time_wait=1,
                connect_timeout=max(1, min(5, round(self.timeout))),
                drain_timeout=max(1, round(self.timeout)),
                tls=self.ssl,
                **auth,
            )
        )
        watcher = asyncio.ensure_future(failed.wait())
        try:
            done, _ = await asyncio.wait({connecting, watcher}, timeout=self.timeout, return_when=asyncio.FIRST_COMPLETED)
        except asyncio.CancelledError:  # reset() or close(): stop connecting in the background too
            connecting.cancel()
            await close_quietly(nc)
            raise
        finally:
            watcher.cancel()
        if connecting in done and connecting.exception() is None:
            if self.settings.tls and not nc._server_info.get("tls_required"):  # a downgrade: refuse
                await close_quietly(nc)
                raise PermissionDenied(f"{self.url}: the server did not negotiate TLS; refusing a plaintext connection")
            established.append(True)
            return nc
        if connecting.done() and connecting.exception() is not None:
            last[:] = [connecting.exception()]  # type: ignore[list-item]
            if isinstance(last[0], _CREDENTIAL_ERRORS):  # e.g. the nkey seed file no longer holds a seed
                fatal[:] = last
        connecting.cancel()
        with contextlib.suppress(BaseException):
            await connecting
        await close_quietly(nc)
        servers = ",".join(self.settings.servers)
        if fatal:
            exc = fatal[0]
            if isinstance(exc, ssl.SSLCertVerificationError):
                raise PermissionDenied(
                    f"{self.url}: TLS certificate verification failed for {servers}: {self.scrub(describe(exc))}"
                )
            if isinstance(exc, _PlaintextRefused):
                raise PermissionDenied(f"{self.url}: {servers} did not negotiate TLS; credentials withheld")
            if isinstance(exc, _CredentialsUnusable):
                raise PermissionDenied(f"{self.url}: cannot log in to {servers}: {exc}")
            if not isinstance(exc, nats.errors.AuthorizationError) and isinstance(exc, _CREDENTIAL_ERRORS):
                raise PermissionDenied(f"{self.url}: cannot log in to {servers}: {self._credential_problem(exc)}")
            raise PermissionDenied(f"{self.url}: authorization failed at {servers}")
        reason = self.scrub(describe(last[0])) if last else "no answer"
        raise Transient(f"{self.url}: cannot connect to {servers} within {self.timeout:g}s: {reason}")

    def _guarded(self, nc: Any, secret: str) -> Callable[[], str]:
        """A credential callback that withholds the secret from a plaintext connection when TLS is required."""

        def credential() -> str:
            if self.settings.tls and not nc._server_info.get("tls_required"):
                raise _PlaintextRefused("server did not negotiate TLS")
            return secret

        return credential

    def _creds_callbacks(self, nc: Any, path: str) -> tuple[Callable[[], bytes], Callable[[str], bytes]]:
        """nats-py's user_jwt_cb and signature_cb for a .creds file, read anew (boundedly) at each connect.

        Called synchronously on the loop by nats-py while it builds CONNECT; a file that cannot
        be used raises _CredentialsUnusable, which nats-py reports as a failed attempt.
        """

        def load() -> bytes:
            if self.settings.tls and not nc._server_info.get("tls_required"):
                raise _PlaintextRefused("server did not negotiate TLS")
            try:
                return credentials.read_file(path, "creds_path")
            except credentials.CredentialError as exc:
                message = str(exc)
            raise _CredentialsUnusable(message)

        def user_jwt() -> bytes:
            data = load()
            try:
                return credentials.user_jwt(data, path)
            except credentials.CredentialError as exc:
                message = str(exc)
            raise _CredentialsUnusable(message)

        def signature(nonce: str) -> bytes:
            data = load()
            try:
                keypair = credentials.creds_keypair(data, path)
            except credentials.CredentialError as exc:
                message = str(exc)
            else:
                return credentials.sign(keypair, nonce)
            raise _CredentialsUnusable(message)

        return user_jwt, signature

    def _credential_problem(self, exc: BaseException) -> str:
        """Why nats-py could not use the nkey seed or .creds file, naming the option and the file."""
        s = self.settings
        option, path = ("creds_path", s.creds_path) if s.creds_path else ("nkey_path", s.nkey_path)
        if isinstance(exc, nats.errors.InvalidUserCredentialsError):
            return f"{option} file {path!r} holds no usable credentials"
        return f"{option} file {path!r} does not hold a valid nkey seed ({type(exc).__name__})"

    async def _open_bucket(self) -> None:
        js = self.js
        try:
            info = await js.stream_info(self.stream)
        except nats.js.errors.NotFoundError:
            if not self.settings.create_bucket:
                raise NotFound(f"{self.url}: object store bucket {self.bucket!r} does not exist") from None
            info = await self._create_bucket()
        config = info.config
        wanted = {f"$O.{self.bucket}.C.>", f"$O.{self.bucket}.M.>"}
        if not wanted <= set(config.subjects or ()) or not config.allow_rollup_hdrs:
            raise StorageError(f"{self.url}: stream {self.stream} exists but is not an object store bucket")
        self.direct = bool(config.allow_direct)

    async def _create_bucket(self) -> Any:
        config = js_api.StreamConfig(
            name=self.stream,
            description="replicator replica",
            subjects=[f"$O.{self.bucket}.C.>", f"$O.{self.bucket}.M.>"],
            max_bytes=self.settings.max_bucket_bytes or -1,
            storage=js_api.StorageType.FILE,
            num_replicas=1,
            discard=js_api.DiscardPolicy.NEW,
            allow_rollup_hdrs=True,
            allow_direct=True,
        )
        started = time.monotonic()
        try:
            info = await self.js.add_stream(config)
        except nats.js.errors.APIError as exc:
            if exc.err_code == ERR_STREAM_NAME_IN_USE:  # created meanwhile, with other limits
                return await self.js.stream_info(self.stream)
            detail = self.scrub(describe(exc))
            cls = PermissionDenied if (exc.code in (401, 403) or "permission" in detail.lower()) else StorageError
            raise cls(f"{self.url}: cannot create object store bucket {self.bucket!r}: {detail}") from None
        except (TimeoutError, nats.errors.TimeoutError) as exc:
            denied = self.denied
            if denied is not None and denied[0] >= started:
                raise PermissionDenied(
                    f"{self.url}: cannot create object store bucket {self.bucket!r}: {self.scrub(denied[1])}"
                ) from None
            raise Transient(f"{self.url}: cannot create object store bucket {self.bucket!r}: timed out") from exc
        log.info("%s: created object store bucket %s", self.url, self.bucket)
        return info

    def _ssl_context(self) -> ssl.SSLContext | None:
        s = self.settings
        if not (s.tls or s.tls_ca_path or s.skip_verify):
            return None
        try:
            context = ssl.create_default_context(cafile=s.tls_ca_path)
        except (OSError, ssl.SSLError) as exc:
            raise BadURL(f"{self.url}: cannot load tls_ca_path {s.tls_ca_path!r}: {exc}") from None
        if s.skip_verify:
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
            log.warning("%s: TLS certificate verification is disabled (skip_verify)", self.url)
        return context


async def close_quietly(nc: Any) -> None:
    with contextlib.suppress(Exception):
        await asyncio.wait_for(nc.close(), 5)
