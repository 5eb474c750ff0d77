"""The `s3` driver: objects in an S3 bucket (AWS or any S3-compatible server), on the minio client.

URL: `s3://BUCKET/PREFIX?endpoint=http://127.0.0.1:9000&region=us-east-1&force-path-style=true`.
Options (keyword arguments, as the config passes them, or in the query with '-' or '_'):
endpoint, region, access_key_id, secret_access_key, session_token, force_path_style,
skip_verify, part_size. Secrets are refused in the URL: give them as options or in the
environment (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_SESSION_TOKEN, or
MINIO_ACCESS_KEY and MINIO_SECRET_KEY).

Objects live under PREFIX + '/' in BUCKET. Uploads stream: at most one part (part_size,
16 MiB by default) is held in memory; an object larger than one part goes up as a
multipart upload, completed (made visible) only once every part is in. A part cut by a
dropped connection or a server error is sent again (bounded attempts with backoff), the
parts already uploaded kept: the resumable upload Capability.MULTIPART declares. Only when
that gives up is the upload aborted. Reads stream and release their connection on close;
a read cut mid-object resumes with a ranged GET from where it stopped, provided the object
kept its size, ETag and Last-Modified (resume.ResumingReader), else IntegrityError.
Timeouts are resumed by neither: the server is hung. urllib3's own retries are off:
callers wrap the driver in RetryingDriver, which retries `Transient` errors. reset()
shuts down every connection, so that a TimeoutDriver can break a request blocked on a
hung server.

Conditional create: put(if_absent=True) checks with HEAD and sends `If-None-Match: *`,
which AWS S3 and MinIO enforce atomically but other servers (rclone serve s3, for one)
ignore. So CONDITIONAL_CREATE is not declared; probe_conditional_create() tests the
server and declares it on the instance when the server really refuses the second create.

Modules: config (URL and options), errors (mapping client errors), http (the connection
pool), multipart (uploads), reader (GET bodies), driver (S3Driver).
"""

from __future__ import annotations

from .config import (
    CONNECT_TIMEOUT,
    DEFAULT_ENDPOINT,
    DEFAULT_PART_SIZE,
    DEFAULT_REGION,
    MAX_PART_SIZE,
    MIN_PART_SIZE,
    POOL_SIZE,
    READ_TIMEOUT,
)
from .driver import S3Driver, from_url

__all__ = [
    "CONNECT_TIMEOUT",
    "DEFAULT_ENDPOINT",
    "DEFAULT_PART_SIZE",
    "DEFAULT_REGION",
    "MAX_PART_SIZE",
    "MIN_PART_SIZE",
    "POOL_SIZE",
    "READ_TIMEOUT",
    "S3Driver",
    "from_url",
]
