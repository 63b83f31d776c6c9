#!/bin/sh
# One-shot of docker-compose.yml (minio-init): the registry's bucket, and a MinIO user of
# its own that may touch that bucket only, so the registry never holds the root password.
# Idempotent: a rerun (every `docker compose up`) leaves everything as it is.
set -eu

mc alias set local http://minio:9000 "$MINIO_ROOT_USER" "$MINIO_ROOT_PASSWORD"
mc mb --ignore-existing "local/$BUCKET"

# What registry/storage/s3.py does: objects (get, put, copy, head, delete), listing, and
# multipart uploads (upload_file splits large blobs; an aborted upload is cleaned up).
cat > /tmp/agora-registry-policy.json <<POLICY
{
  "Version": "2012-10-17",
  "Statement": [
    {
      "Effect": "Allow",
      "Action": ["s3:GetBucketLocation", "s3:ListBucket", "s3:ListBucketMultipartUploads"],
      "Resource": ["arn:aws:s3:::$BUCKET"]
    },
    {
      "Effect": "Allow",
      "Action": [
        "s3:GetObject", "s3:PutObject", "s3:DeleteObject",
        "s3:AbortMultipartUpload", "s3:ListMultipartUploadParts"
      ],
      "Resource": ["arn:aws:s3:::$BUCKET/*"]
    }
  ]
}
POLICY
mc admin policy create local agora-registry /tmp/agora-registry-policy.json
mc admin user add local "$S3_ACCESS_KEY_ID" "$S3_SECRET_ACCESS_KEY"
# `policy attach` fails when the policy is attached already (a rerun): detach first.
mc admin policy detach local agora-registry --user "$S3_ACCESS_KEY_ID" >/dev/null 2>&1 || true
mc admin policy attach local agora-registry --user "$S3_ACCESS_KEY_ID"
