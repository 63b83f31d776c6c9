"""A real S3 server on loopback for the tests: moto's server mode in a thread.

Not a mocked client: boto3 talks HTTP to a server on 127.0.0.1, the same code path as
against MinIO or AWS. Import the fixtures into a conftest:
``from s3_fixture import s3_server, s3_storage_url``.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest

S3_ENV = {
    "AWS_ACCESS_KEY_ID": "agora-test",
    "AWS_SECRET_ACCESS_KEY": "agora-test-secret",
    "AWS_DEFAULT_REGION": "us-east-1",
}


@pytest.fixture(scope="session")
def s3_server() -> Iterator[str]:
    """Start moto's S3 server on a free loopback port; yields its endpoint URL."""
    from moto.server import ThreadedMotoServer

    with pytest.MonkeyPatch.context() as mp:
        for name, value in S3_ENV.items():
            mp.setenv(name, value)
        # A developer's AWS profile or config must not leak into the tests.
        mp.delenv("AWS_PROFILE", raising=False)
        mp.delenv("AWS_SESSION_TOKEN", raising=False)
        server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        server.start()
        host, port = server.get_host_and_port()
        try:
            yield f"http://{host}:{port}"
        finally:
            server.stop()


@pytest.fixture
def s3_storage_url(s3_server: str) -> Iterator[str]:
    """A fresh, empty bucket on the loopback server, as a storage URL ``s3://bucket``."""
    import boto3

    bucket = f"agora-test-{uuid.uuid4().hex[:12]}"
    client = boto3.client("s3", endpoint_url=s3_server, region_name="us-east-1")
    client.create_bucket(Bucket=bucket)
    yield f"s3://{bucket}"
    # Empty and drop the bucket so a long session does not accumulate objects in memory.
    paginator = client.get_paginator("list_objects_v2")
    for page in paginator.paginate(Bucket=bucket):
        for obj in page.get("Contents", []):
            client.delete_object(Bucket=bucket, Key=obj["Key"])
    client.delete_bucket(Bucket=bucket)
