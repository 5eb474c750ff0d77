"""One S3 upload: a single PUT when the object fits in one part, else a multipart upload.

At most one part is held in memory. A multipart upload is completed (the object appears)
only once every part is in, and aborted when the put fails, so that readers never see a
partial object. A part that fails with a dropped connection or a server error is sent
again (resume.Backoff: bounded attempts, backoff), keeping the parts already uploaded:
this is the resumable upload that Capability.MULTIPART declares. Timeouts are not
retried here (see resume.py); the RetryingDriver around the driver redoes the put.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any
from xml.etree import ElementTree

from minio import Minio
from minio.datatypes import Part
from minio.helpers import md5sum_hash

from ..activity import expired
from ..errors import StorageError
from ..resume import DEFAULT_BACKOFF, Backoff, is_timeout, should_resume
from .errors import CODE_IN_BODY, ErrorMapper, code_of

log = logging.getLogger("replicas.s3")


class Upload:
    """Streams chunks into parts of part_size bytes; see the module docstring."""

    def __init__(
        self,
        client: Minio,
        errors: ErrorMapper,
        bucket: str,
        name: str,
        key: str,
        *,
        part_size: int,
        if_absent: bool,
        backoff: Backoff = DEFAULT_BACKOFF,
    ) -> None:
        self._client = client
        self._errors = errors
        self._bucket = bucket
        self._name = name
        self._key = key
        self._part_size = part_size
        self._if_absent = if_absent
        self._backoff = backoff
        self._headers = {"Content-Type": "application/octet-stream"}
        self._buffer = bytearray()  # grows to part_size once, then is refilled in place
        self._fill = 0
        self._upload_id: str | None = None
        self._parts: list[Part] = []
        self.sent = 0

    def run(self, chunks: Iterable[bytes | memoryview]) -> str:
        """Upload every chunk and make the object visible; returns its ETag ('' if unknown)."""
        try:
            for chunk in chunks:
                self._add(memoryview(chunk).cast("B"))
            etag = self._finish()
        except BaseException as exc:
            if self._upload_id is not None:
                self._abort(exc)
            raise
        return etag

    def _add(self, view: memoryview) -> None:
        pos = 0
        while pos < len(view):
            if self._fill == self._part_size:  # a full part and more data: it is a multipart upload
                with memoryview(self._buffer) as body:
                    self._send_part(body)
                self.sent += self._fill
                self._fill = 0
            n = min(self._part_size - self._fill, len(view) - pos)
            self._buffer[self._fill : self._fill + n] = view[pos : pos + n]
            self._fill += n
            pos += n

    def _finish(self) -> str:
        with memoryview(self._buffer) as whole, whole[: self._fill] as body:
            if self._upload_id is None:
                headers = dict(self._headers, **({"If-None-Match": "*"} if self._if_absent else {}))
                result = self._errors.call(
                    "put", self._key, lambda: self._client._put_object(self._bucket, self._name, body, headers)
                )
                etag = result.etag
            else:
                self._send_part(body)
                etag = self._complete()
        self.sent += self._fill
        return etag

    def _send_part(self, body: memoryview) -> None:
        if self._upload_id is None:
            self._upload_id = self._errors.call(
                "put",
                self._key,
                lambda: self._client._create_multipart_upload(self._bucket, self._name, dict(self._headers)),
            )
        number = len(self._parts) + 1
        self._parts.append(Part(number, self._upload_part(number, body)))

    def _upload_part(self, number: int, body: memoryview) -> str:
        """UploadPart, retried (the part is still in memory) while the failure is worth it.

        The parts already uploaded stay: a dropped connection costs one part, not the
        object. Only when this gives up does the put fail (and abort the upload).
        """
        attempt = 0
        while True:
            attempt += 1
            try:
                return self._client._upload_part(self._bucket, self._name, body, None, self._upload_id, number)
            except Exception as exc:  # noqa: BLE001 - every client error is mapped
                error = exc if isinstance(exc, StorageError) else self._errors.translate(exc, "put", self._key)
                if attempt > self._backoff.attempts or not should_resume(error) or code_of(exc) == "NoSuchUpload":
                    raise error from None
            log.warning(
                "%s: retrying part %d of %r (attempt %d of %d) after: %s",
                self._errors.url, number, self._key, attempt, self._backoff.attempts, error,
            )
            self._backoff.wait(attempt)

    def _complete(self) -> str:
        """CompleteMultipartUpload, with If-None-Match when creating conditionally."""
        element = ElementTree.Element("CompleteMultipartUpload")
        for part in self._parts:
            tag = ElementTree.SubElement(element, "Part")
            ElementTree.SubElement(tag, "PartNumber").text = str(part.part_number)
            ElementTree.SubElement(tag, "ETag").text = f'"{part.etag}"'
        body = ElementTree.tostring(element)
        headers = {"Content-Type": "application/xml", "Content-MD5": md5sum_hash(body)}
        if self._if_absent:
            headers["If-None-Match"] = "*"
        response = self._errors.call(
            "put",
            self._key,
            lambda: self._client._execute(
                "POST",
                self._bucket,
                self._name,
                body=body,
                headers=headers,
                query_params={"uploadId": self._upload_id},
            ),
        )
        return _completed_etag(self._errors, response, self._key)

    def _abort(self, cause: BaseException) -> None:
        """Best-effort AbortMultipartUpload; skipped when the server just timed out.

        A hung server would hold the abort as long as the upload (and a TimeoutDriver that
        gave up on the put no longer watches it), so then the server has to expire it.
        """
        url, key, upload_id = self._errors.url, self._key, self._upload_id
        if is_timeout(cause) or expired():
            log.warning(
                "%s: not aborting the multipart upload of %r after a timeout; the server expires it",
                url,
                key,
            )
            return
        try:
            self._errors.call(
                "abort upload of",
                key,
                lambda: self._client._abort_multipart_upload(self._bucket, self._name, upload_id),
            )
        except StorageError as exc:
            log.warning("%s: could not abort the multipart upload of %r: %s", url, key, exc)


def _completed_etag(errors: ErrorMapper, response: Any, key: str) -> str:
    """The ETag in a CompleteMultipartUpload reply; S3 may report a failure in a 200 reply."""
    text = response.data.decode("utf-8", "replace") if response.data else ""
    try:
        root = ElementTree.fromstring(text) if text.strip() else None
    except ElementTree.ParseError:
        root = None
    if root is not None and root.tag.rpartition("}")[2] == "Error":
        code = CODE_IN_BODY.search(text)
        raise errors.from_status(500, code.group(1) if code else "InternalError", "put", key)
    etag = ""
    if root is not None:
        for child in root.iter():
            if child.tag.rpartition("}")[2] == "ETag" and child.text:
                etag = child.text.strip('"')
    return etag
