"""The `nats` driver: objects in a NATS JetStream object store bucket.

URL: `nats://[TOKEN@ | USER:PASSWORD@]HOST[:PORT][,HOST2[:PORT]...]/BUCKET[/PREFIX]`.
Options (keywords or URL query): username, password, token, nkey_path, creds_path,
tls_ca_path, skip_verify, max_bucket_bytes, timeout (seconds per request, default 10),
create_bucket (default true), tls. An nkey_path or creds_path file is checked when the
driver is opened (a malformed one is BadURL). The object name is PREFIX/ + key. TLS is required
(never downgraded, certificates verified unless skip_verify) with `tls=true`, a
tls_ca_path, or a `tls://` URL given to NATSDriver.from_url; a server that demands TLS
gets it in any case.

nats-py is asyncio; the driver owns a private event loop in a daemon thread and every
method submits coroutines to it (`run_coroutine_threadsafe`), so callers stay synchronous
and thread-safe. Every await on the network carries a timeout: an outage turns into
Transient within about `timeout` seconds, never a hang, and nats-py reconnects by itself.

The wire format is the JetStream object store's (chunks on `$O.<bucket>.C.<nuid>`, a JSON
meta on `$O.<bucket>.M.<base64 name>` with a rollup header), so nats-py's ObjectStore and
the `nats` CLI read what this driver writes. Behaviour on top of it:

- put uploads the chunks from the calling thread (so a progress callback may use the
  driver), then publishes the meta: readers see the old object or the whole new one.
  A failed put purges its chunks, at once or, if the server is unreachable, later (after
  checking no meta points at them).
- put(if_absent=True) publishes the meta with Nats-Expected-Last-Subject-Sequence, which
  makes the create atomic (Capability.CONDITIONAL_CREATE).
- delete purges the meta (only up to the revision it read, so a concurrent put survives)
  and the chunks; it leaves no tombstone. Tombstones written by other clients are never
  listed.
- no resume of an interrupted transfer (MULTIPART is not declared): the object store can
  neither append chunks to a failed put nor start a download at a byte offset. reset()
  cancels the operations in flight and closes the connection.
- get downloads into a spooled temporary file (memory up to SPOOL_MEMORY, then disk),
  checking size and SHA-256 digest, and returns it: small objects by direct gets, large
  ones through a pull consumer, FETCH_BATCH chunks at a time (bounded memory). If the
  object is replaced while being read it starts again on the new revision. offset/length
  skip bytes rather than seek (a range read stops early but still transfers the chunks
  before the offset), so RANGE_READ is not declared.
- list reads every meta of the bucket once through an ordered consumer (names are base64
  in the subjects, so the server cannot filter by prefix; memory grows with the number of
  matching objects), then filters, sorts, and yields; page_size is only validated.

Modules: config (URL and options), credentials (nkey seed and .creds files), loop (the
event loop thread), connection (the client and the bucket), errors (mapping nats-py
errors), store (metas, chunks, commits, deletes), download (get), listing (list), driver
(NATSDriver).
"""

from __future__ import annotations

try:
    import nats as _nats_py  # noqa: F401  (an optional dependency: checked here once)
except ImportError:  # pragma: no cover
    from ..errors import BadURL

    def from_url(url: str, **options: object):  # type: ignore[no-untyped-def]
        """nats-py is missing: refuse nats replicas with a hint."""
        raise BadURL("nats replicas need nats-py: pip install 'replicator[remote]'")

else:
    from .config import DEFAULT_PORT, DEFAULT_TIMEOUT, Settings
    from .download import DIRECT_READ_MAX_CHUNKS, FETCH_BATCH
    from .driver import SPOOL_MEMORY, NATSDriver, from_url
    from .store import CHUNK_BYTES, MAX_ORPHANS, STALL_CHECK

__all__ = [
    "CHUNK_BYTES",
    "DEFAULT_PORT",
    "DEFAULT_TIMEOUT",
    "DIRECT_READ_MAX_CHUNKS",
    "FETCH_BATCH",
    "MAX_ORPHANS",
    "SPOOL_MEMORY",
    "STALL_CHECK",
    "NATSDriver",
    "Settings",
    "from_url",
]
