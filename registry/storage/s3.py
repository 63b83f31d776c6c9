"""Blobs in S3 (or MinIO, or any S3-compatible server) through boto3.

Large blobs go up as multipart uploads from the staging file (boto3 reads each part from
disk as it sends it, so memory stays at part size x concurrency). S3's own multipart
checksums are composites of the parts, not a sha256 of the object, which is why the
content address always comes from the server's own hash of the staging file.

An S3 that fails or goes away during an upload is a 503 ``storage_unavailable`` (with
``Retry-After``), after boto3's own retries. Nothing half-written becomes visible: an
object appears only when its single PUT or its multipart upload completes. A multipart
upload that could not even be aborted (S3 was gone) keeps its parts on the server, out
of sight; ``incomplete_uploads`` lists those and the garbage collector aborts them after
its grace period (registry/services/gc.py), as an S3 lifecycle rule would.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

from registry.errors import ServiceUnavailable
from registry.storage.base import (
    DEFAULT_CHUNK,
    BlobStore,
    StoredBlob,
    background_syncs,
    blob_key,
    digest_of_key,
)

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client


def parse_s3_url(url: str) -> tuple[str, str]:
    """``s3://bucket[/prefix]`` -> (bucket, prefix ending in "/" or "")."""
    if not url.startswith("s3://"):
        raise ValueError(f"not an s3:// URL: {url!r}")
    bucket, _, prefix = url[len("s3://") :].partition("/")
    if not bucket:
        raise ValueError(f"no bucket in {url!r}")
    prefix = prefix.strip("/")
    return bucket, f"{prefix}/" if prefix else ""


_MISSING = {"404", "NoSuchKey", "NotFound", "NoSuchUpload"}


def _is_missing(exc: Exception) -> bool:
    from botocore.exceptions import ClientError

    return isinstance(exc, ClientError) and exc.response.get("Error", {}).get("Code") in _MISSING


@contextmanager
def _storage_errors(action: str, bucket: str) -> Iterator[None]:
    """S3 failures as the service's errors: an absent object is ``FileNotFoundError``;
    an unreachable or failing S3 is a 503 ``storage_unavailable``, not a 500."""
    from boto3.exceptions import Boto3Error
    from botocore.exceptions import BotoCoreError, ClientError

    try:
        yield
    except (BotoCoreError, ClientError, Boto3Error) as exc:
        if _is_missing(exc):
            raise FileNotFoundError(f"{action}: no such object in s3://{bucket}") from exc
        raise ServiceUnavailable(
            f"S3 bucket {bucket!r} failed to {action}: {exc}", code="storage_unavailable"
        ) from exc


class IncompleteUpload(NamedTuple):
    """A multipart upload begun under a blob key and never completed nor aborted."""

    key: str
    upload_id: str
    initiated: dt.datetime  # UTC


# S3's single-request CopyObject limit.
_MAX_COPY_BYTES = 5 * 1024**3


class S3BlobStore(BlobStore):
    def __init__(
        self,
        *,
        bucket: str,
        prefix: str = "",
        endpoint_url: str | None = None,
        region: str = "us-east-1",
        multipart_threshold: int = 64 << 20,
        multipart_chunksize: int = 64 << 20,
        max_concurrency: int = 4,
        max_attempts: int = 5,
        client: S3Client | None = None,
    ) -> None:
        import boto3
        from boto3.s3.transfer import TransferConfig
        from botocore.config import Config

        self.bucket = bucket
        self.prefix = prefix
        self.location = f"s3://{bucket}/{prefix}" + (f" at {endpoint_url}" if endpoint_url else "")
        if client is None:
            client = boto3.client(
                "s3",
                endpoint_url=endpoint_url,
                region_name=region,
                config=Config(
                    # Each request, with backoff, before S3 counts as unavailable (503).
                    retries={"max_attempts": max_attempts, "mode": "standard"},
                    # Enough connections for the transfer threads plus concurrent downloads.
                    max_pool_connections=max(10, 2 * max_concurrency),
                    # Checksums only where S3 requires them: integrity is the server's own
                    # sha256, and many S3-compatible servers (older MinIO, Ceph) reject the
                    # default trailing CRC checksums that recent botocore sends.
                    request_checksum_calculation="when_required",
                    response_checksum_validation="when_required",
                ),
            )
        self.client: S3Client = client
        self.transfer_config = TransferConfig(
            multipart_threshold=multipart_threshold,
            multipart_chunksize=multipart_chunksize,
            max_concurrency=max_concurrency,
            use_threads=True,
        )

    def _object(self, key: str) -> str:
        if digest_of_key(key) is None:
            raise ValueError(f"not a blob key: {key!r}")
        return self.prefix + key

    def check(self) -> None:
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            self.client.head_bucket(Bucket=self.bucket)
        except (BotoCoreError, ClientError) as exc:
            raise ServiceUnavailable(
                f"S3 bucket {self.bucket!r} is not reachable: {exc}", code="storage_unavailable"
            ) from exc

    def _head(self, key: str) -> dict[str, Any] | None:
        try:
            with _storage_errors("read an object's size", self.bucket):
                return dict(self.client.head_object(Bucket=self.bucket, Key=self._object(key)))
        except FileNotFoundError:
            return None

    def commit(self, path: Path, hexdigest: str) -> str:
        key = blob_key(hexdigest)
        try:
            head = self._head(key)
            with _storage_errors("store a blob", self.bucket):
                if head is not None and int(head["ContentLength"]) <= _MAX_COPY_BYTES:
                    # Already stored: copy the object onto itself to refresh LastModified,
                    # the age the garbage collector judges by (it may be an orphan about to
                    # go, and a row is about to point at it).
                    self.client.copy_object(
                        Bucket=self.bucket,
                        Key=self._object(key),
                        CopySource={"Bucket": self.bucket, "Key": self._object(key)},
                        MetadataDirective="REPLACE",
                        ContentType="application/octet-stream",
                    )
                else:
                    # Absent, or too large for a single copy: (re)upload the verified bytes.
                    self.client.upload_file(
                        str(path),
                        self.bucket,
                        self._object(key),
                        ExtraArgs={"ContentType": "application/octet-stream"},
                        Config=self.transfer_config,
                    )
        finally:
            background_syncs.forget(path)
            path.unlink(missing_ok=True)
        return key

    def exists(self, key: str) -> bool:
        return self._head(key) is not None

    def size(self, key: str) -> int:
        head = self._head(key)
        if head is None:
            raise FileNotFoundError(key)
        return int(head["ContentLength"])

    def modified(self, key: str) -> dt.datetime:
        head = self._head(key)
        if head is None:
            raise FileNotFoundError(key)
        modified: dt.datetime = head["LastModified"]
        return modified.astimezone(dt.UTC)

    def iter_range(
        self, key: str, start: int = 0, stop: int | None = None, *, chunk_size: int = DEFAULT_CHUNK
    ) -> Iterator[bytes]:
        if stop is not None and stop <= start:
            return
        byte_range = f"bytes={start}-" + ("" if stop is None else str(stop - 1))
        with _storage_errors("read a blob", self.bucket):
            response = self.client.get_object(
                Bucket=self.bucket, Key=self._object(key), Range=byte_range
            )
            body = response["Body"]
            try:
                yield from body.iter_chunks(chunk_size)
            finally:
                body.close()

    def delete(self, key: str) -> None:
        with _storage_errors("delete a blob", self.bucket):
            self.client.delete_object(Bucket=self.bucket, Key=self._object(key))

    def list_blobs(self) -> Iterator[StoredBlob]:
        paginator = self.client.get_paginator("list_objects_v2")
        pages = paginator.paginate(Bucket=self.bucket, Prefix=self.prefix + "sha256/")
        with _storage_errors("list blobs", self.bucket):
            yield from self._blobs_in(pages)

    def incomplete_uploads(self) -> Iterator[IncompleteUpload]:
        """Multipart uploads under the blob prefix that were neither completed nor aborted."""
        paginator = self.client.get_paginator("list_multipart_uploads")
        pages = paginator.paginate(Bucket=self.bucket, Prefix=self.prefix + "sha256/")
        with _storage_errors("list incomplete uploads", self.bucket):
            for page in pages:
                for upload in page.get("Uploads", []):
                    key = upload["Key"][len(self.prefix) :]
                    if digest_of_key(key) is None:
                        continue
                    initiated = upload["Initiated"].astimezone(dt.UTC)
                    yield IncompleteUpload(key, upload["UploadId"], initiated)

    def abort_upload(self, upload: IncompleteUpload) -> None:
        """Abort an incomplete multipart upload and free its parts."""
        try:
            with _storage_errors("abort an incomplete upload", self.bucket):
                self.client.abort_multipart_upload(
                    Bucket=self.bucket, Key=self._object(upload.key), UploadId=upload.upload_id
                )
        except FileNotFoundError:
            pass  # NoSuchUpload: completed or aborted meanwhile

    def _blobs_in(self, pages: Any) -> Iterator[StoredBlob]:
        for page in pages:
            for obj in page.get("Contents", []):
                key = obj["Key"][len(self.prefix) :]
                if digest_of_key(key) is None:
                    continue
                yield StoredBlob(key, int(obj["Size"]), obj["LastModified"].astimezone(dt.UTC))
