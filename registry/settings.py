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
    max_json_body_bytes: int | None = Field(
        default=None,
        ge=1,
        description=(
            "Largest request body that is not a streamed upload (JSON: search, compositions, "
            "evaluations, job results), refused with 413 before it is read. Default: 3 x the "
            "largest JSON content limit (max_job_payload_bytes, max_job_result_bytes) + 1 MiB, "
            "4 MiB as shipped: JSON escapes at most triple text (a character outside the "
            "BMP written as a \\uXXXX\\uXXXX pair); the per-route limits then apply to the "
            "content (docs/registry.md)."
        ),
    )

    blob_gc_grace_seconds: int = Field(
        default=24 * 3600,
        description="Unreferenced blobs younger than this are kept (an upload may be in flight).",
    )
    idempotency_ttl_seconds: int = 24 * 3600
    idempotency_reservation_seconds: int = Field(
        default=15 * 60,
        description=(
            "A key reserved by a request that never finished (its process died) is taken "
            "over by the next request with it after this (registry/services/idempotency.py)."
        ),
    )

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

    # Limits (registry/api/limits.py). Rates are token buckets in each server process's
    # memory: N replicas allow N times these. A rate of 0 turns that limit off.
    rate_limit_anonymous_per_second: float = Field(
        default=20.0,
        ge=0,
        description="Requests per second per client address without a working token.",
    )
    rate_limit_anonymous_burst: int = Field(default=100, ge=1)
    rate_limit_token_per_second: float = Field(
        default=50.0, ge=0, description="Requests per second per bearer token."
    )
    rate_limit_token_burst: int = Field(default=200, ge=1)
    rate_limit_search_per_second: float = Field(
        default=0.5,
        ge=0,
        description="POST /v1/search per second per token or address, on top of the above.",
    )
    rate_limit_search_burst: int = Field(default=10, ge=1)
    search_max_per_client: int = Field(
        default=2,
        ge=0,
        description="Searches one token or address may have running or queued (0: no cap).",
    )
    search_max_concurrent: int = Field(
        default=2,
        ge=0,
        description="Searches a process runs at once (0: no bound); more wait in a queue.",
    )
    search_max_queued: int = Field(
        default=8,
        ge=0,
        description="Searches that may wait for a slot; beyond, 503 search_busy + Retry-After.",
    )
    header_timeout_seconds: float = Field(
        default=15.0,
        ge=0,
        description=(
            "`agora serve` closes a connection whose request line and headers are not all "
            "in after this (0: never)."
        ),
    )
    body_timeout_seconds: float = Field(
        default=30.0,
        ge=0,
        description="408 request_timeout when no body byte arrives for this long (0: never).",
    )
    body_min_bytes_per_second: float = Field(
        default=1024.0,
        ge=0,
        description=(
            "A body must also average this rate: its deadline is the start + "
            "body_timeout_seconds + received bytes / this rate (0: idle timeout only)."
        ),
    )

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
    worker_suspend_after_refusals: int = Field(
        default=5,
        ge=1,
        description=(
            "A worker token whose results are refused this many times in a row is suspended "
            "(403 token_suspended) until `agora admin lift-suspension`."
        ),
    )
    verify_worker_outputs: Literal["untrusted", "all"] = Field(
        default="untrusted",
        description=(
            "Which workers' produced experts stay quarantined until a second worker checks "
            "them: those of untrusted worker tokens, or all (docs/architecture.md, "
            "'Workers that lie')."
        ),
    )
    verify_bits_per_byte_rtol: float = Field(
        default=0.01,
        gt=0,
        le=1,
        description=(
            "Relative tolerance between the bits per byte a worker claims and a second "
            "worker's measurement of the same expert on the same texts."
        ),
    )
    verify_tensor_rtol: float = Field(
        default=1e-4,
        gt=0,
        le=1,
        description=(
            "Relative tolerance (of each tensor's largest magnitude; at least 2 ulps of a "
            "16-bit dtype) between a reproducible output and its replica, when their bytes "
            "differ; also between their reported weights."
        ),
    )
    # Checks on arrival (registry/services/arrival.py; docs/governance.md, "Checks on
    # arrival").
    arrival_checks: bool = Field(
        default=True,
        description=(
            "A submitted expert or version stays quarantined until an evaluate job measures "
            "it on its own datasheet samples against the base; off: it is active at once."
        ),
    )
    arrival_min_gain: float = Field(
        default=0.0,
        ge=0,
        lt=1,
        description=(
            "The relative improvement over the base, (base - expert) / base in bits per "
            "byte on its own samples, an arriving version must exceed to become active "
            "(0: strictly better than the base); otherwise it is flagged to moderators."
        ),
    )
    # Monitoring (docs/governance.md, "Monitoring").
    monitor_max_worsening: float = Field(
        default=0.02,
        ge=0,
        le=10,
        description=(
            "A monitored expert whose own-domain bits per byte exceed its reference's by "
            "more than this share (0.02: 2%) is flagged."
        ),
    )
    monitor_max_repetition: float = Field(
        default=0.5,
        ge=0,
        le=1,
        description=(
            "A monitored expert whose greedy continuations repeat more than this share of "
            "their 4-grams, and more than the base's, is flagged."
        ),
    )
    monitor_prompts: int = Field(default=3, ge=1, le=16)
    monitor_prompt_tokens: int = Field(default=16, ge=1, le=256)
    monitor_new_tokens: int = Field(default=48, ge=8, le=512)
    max_text_set_bytes: int = Field(
        default=256 * KiB,
        ge=1,
        description="UTF-8 bytes of one uploaded text set (a monitoring benchmark).",
    )
    web_session_hours: float = Field(
        default=12.0,
        gt=0,
        le=24 * 30,
        description="How long a web sign-in lasts (registry/web/sessions.py); sign-out ends "
        "it at once.",
    )
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
    def json_body_limit(self) -> int:
        """``max_json_body_bytes``, or its default derived from the content limits."""
        if self.max_json_body_bytes is not None:
            return self.max_json_body_bytes
        return 3 * max(self.max_job_payload_bytes, self.max_job_result_bytes) + MiB

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
