"""Content-addressed blob storage behind one interface: a local directory or S3.

See :mod:`registry.storage.base` for the life of an upload (stage, validate, commit blob,
commit row) and the guarantees each step gives.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import unquote, urlparse

from registry.storage.base import (
    DEFAULT_CHUNK,
    BlobStore,
    Staging,
    StagingFile,
    StoredBlob,
    blob_key,
    digest_of_key,
)
from registry.storage.local import LocalBlobStore

if TYPE_CHECKING:
    from registry.settings import Settings

__all__ = [
    "DEFAULT_CHUNK",
    "BlobStore",
    "LocalBlobStore",
    "Staging",
    "StagingFile",
    "StoredBlob",
    "blob_key",
    "digest_of_key",
    "open_blob_store",
    "open_staging",
]


def open_blob_store(settings: Settings) -> BlobStore:
    """The blob store ``settings.storage_url`` names (``file://...``, a path, or ``s3://...``)."""
    url = settings.resolved_storage_url
    if url.startswith("s3://"):
        from registry.storage.s3 import S3BlobStore, parse_s3_url

        bucket, prefix = parse_s3_url(url)
        return S3BlobStore(
            bucket=bucket,
            prefix=prefix,
            endpoint_url=settings.s3_endpoint_url,
            region=settings.s3_region,
            multipart_threshold=settings.s3_multipart_threshold_bytes,
            multipart_chunksize=settings.s3_multipart_chunk_bytes,
        )
    parsed = urlparse(url)
    if parsed.scheme == "file":
        return LocalBlobStore(Path(unquote(parsed.path)))
    if parsed.scheme == "":
        return LocalBlobStore(Path(url))
    raise ValueError(f"unsupported storage URL {url!r}: use file:///path or s3://bucket[/prefix]")


def open_staging(settings: Settings) -> Staging:
    # Only the local store keeps the staging file itself (renamed into place), so only
    # then is it worth flushing to disk while the upload is validated.
    local = not settings.resolved_storage_url.startswith("s3://")
    return Staging(settings.staging_dir, sync_on_close=local)
