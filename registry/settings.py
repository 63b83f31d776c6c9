"""Service settings, read from the environment with the ``AGORA_`` prefix.

The embedded default needs nothing: a SQLite file and a blob directory under ``./.agora/``.
Production points ``AGORA_DATABASE_URL`` at PostgreSQL and ``AGORA_STORAGE_URL`` at
``s3://bucket[/prefix]`` (with ``AGORA_S3_ENDPOINT_URL`` for MinIO or any other S3).
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

KiB = 1024
MiB = 1024 * KiB
GiB = 1024 * MiB


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="AGORA_", extra="ignore")

    data_dir: Path = Field(
        default=Path(".agora"),
        description="Root of the embedded defaults: SQLite file, blob directory, staging area.",
    )
    database_url: str | None = Field(
        default=None,
        description="SQLAlchemy URL; default sqlite:///<data_dir>/agora.db.",
    )
    storage_url: str | None = Field(
        default=None,
        description="file:///path or s3://bucket[/prefix]; default <data_dir>/blobs.",
    )
    s3_endpoint_url: str | None = Field(default=None, description="S3 endpoint (MinIO...).")
    s3_region: str = "us-east-1"
    # A part size of 64 MiB keeps a 1 GiB upload to 16 parts and bounds the transfer
    # buffers boto3 holds (part size x concurrency) well below the 200 MB RSS goal.
    s3_multipart_chunk_bytes: int = 64 * MiB
    s3_multipart_threshold_bytes: int = 64 * MiB

    auto_migrate: bool | None = Field(
        default=None,
        description=(
            "Run migrations at start. Default: only for SQLite (the embedded default); a "
            "shared PostgreSQL is migrated explicitly with `agora db upgrade`."
        ),
    )

    max_expert_bytes: int = 4 * GiB
    max_datasheet_bytes: int = 256 * KiB
    max_base_config_bytes: int = 1 * MiB
    max_base_tokenizer_bytes: int = 64 * MiB
    max_base_weights_bytes: int = 64 * GiB
    max_form_field_bytes: int = 16 * KiB

    blob_gc_grace_seconds: int = Field(
        default=24 * 3600,
        description="Unreferenced blobs younger than this are kept (an upload may be in flight).",
    )
    idempotency_ttl_seconds: int = 24 * 3600

    embedder: Literal["minilm", "hashing"] = Field(
        default="minilm",
        description=(
            "Retrieval embedder: minilm (all-MiniLM-L6-v2, needs the `embed` extra) or "
            "hashing (hashed n-gram TF-IDF, no model). Changing it re-embeds at start."
        ),
    )
    retrieval_exact_max_vectors: int = Field(
        default=20_000,
        description="Per base revision, exact FAISS search up to this many vectors; HNSW above.",
    )
    retrieval_refresh_seconds: float = Field(
        default=2.0,
        description="A search checks for other replicas' changes when the last check is older.",
    )
    retrieval_max_centroids: int = Field(
        default=3, description="Mode centroids an expert may add to its mean vector."
    )
    search_max_k: int = 64
    search_max_texts: int = 256
    # The same budget as a datasheet's samples: a query is at most as much text as an expert.
    search_max_text_bytes: int = 64 * KiB

    job_lease_seconds: int = Field(
        default=60, description="A lease a worker does not renew by heartbeat expires after this."
    )
    job_max_attempts: int = Field(
        default=3, description="Leases a job gets; then it is `dead` (visible, not retried)."
    )
    job_backoff_base_seconds: float = Field(
        default=2.0, description="A retried job waits base x 2^(attempt-1) seconds (jittered)."
    )
    job_backoff_max_seconds: float = 300.0
    max_job_payload_bytes: int = Field(
        default=1 * MiB, description="Texts and parameters a composition or evaluation carries."
    )
    max_job_result_bytes: int = 1 * MiB
    embedded_worker: bool | None = Field(
        default=None,
        description=(
            "`agora serve` runs one worker in-process. Default: on for SQLite (the embedded "
            "default), off otherwise (workers run as `agora worker`)."
        ),
    )

    @property
    def resolved_database_url(self) -> str:
        if self.database_url:
            return self.database_url
        return f"sqlite:///{(self.data_dir / 'agora.db').resolve()}"

    @property
    def resolved_storage_url(self) -> str:
        if self.storage_url:
            return self.storage_url
        return (self.data_dir / "blobs").resolve().as_uri()

    @property
    def staging_dir(self) -> Path:
        return self.data_dir / "staging"

    @property
    def is_sqlite(self) -> bool:
        return self.resolved_database_url.startswith("sqlite")

    @property
    def should_run_embedded_worker(self) -> bool:
        return self.is_sqlite if self.embedded_worker is None else self.embedded_worker

    @property
    def should_auto_migrate(self) -> bool:
        return self.is_sqlite if self.auto_migrate is None else self.auto_migrate
