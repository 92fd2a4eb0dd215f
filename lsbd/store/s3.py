"""`s3://bucket/prefix`: a store in an S3 bucket or any S3-compatible service.

This is the only module that imports boto3/botocore.  One boto3 client is
shared by every thread (boto3 clients are thread-safe); botocore's own retries
are switched off because RetryingStore retries TransientStoreError with its own
backoff, and two layers of retries would multiply each other.

Objects live under `prefix/` in the bucket; every key the Store interface sees
or returns is relative to that prefix.

Conditional create (put(exclusive=True)) sends `If-None-Match: *`: S3 answers
412 PreconditionFailed when the key exists (-> ObjectExists), or 409
ConditionalRequestConflict while a concurrent write to the same key is in
progress (-> TransientStoreError: a retry gets a definite answer).

Error mapping:
  NoSuchKey / 404 on a key            ObjectNotFound
  412 on an exclusive put             ObjectExists
  throttling, 5xx, 409 conflicts,
  connection errors, timeouts         TransientStoreError
  NoSuchBucket, AccessDenied, bad or
  missing credentials, TLS failures   StoreError (one line naming the bucket)

Endpoints: with an endpoint URL (argument, or AWS_ENDPOINT_URL_S3 /
AWS_ENDPOINT_URL in the environment) path-style addressing is used, which is
what S3-compatible servers expect.  Credentials and region come from the usual
AWS chain (environment, profile, instance role); they never appear in messages.
"""

from __future__ import annotations

import errno
import os
import threading
from typing import Iterator

import boto3
import botocore.config
import botocore.exceptions

from lsbd.errors import ObjectExists, ObjectNotFound, StoreError, TransientStoreError
from lsbd.store.base import ObjectInfo, Store

# Error codes S3 (and compatible services) use for "try again later".
_TRANSIENT_CODES = frozenset({
    "SlowDown", "Throttling", "ThrottlingException", "ThrottledException",
    "RequestThrottled", "RequestThrottledException", "TooManyRequests",
    "TooManyRequestsException", "ProvisionedThroughputExceededException",
    "RequestLimitExceeded", "BandwidthLimitExceeded", "RequestTimeout",
    "RequestTimeoutException", "InternalError", "ServiceUnavailable",
    "ConditionalRequestConflict", "OperationAborted", "PriorRequestNotComplete",
    "EC2ThrottledException",
})
_NOT_FOUND_CODES = frozenset({"NoSuchKey", "404", "NotFound"})
_ACCESS_CODES = frozenset({
    "AccessDenied", "403", "Forbidden", "InvalidAccessKeyId", "SignatureDoesNotMatch",
    "ExpiredToken", "InvalidToken", "TokenRefreshRequired", "AllAccessDisabled",
    "AccountProblem", "InvalidSecurity",
})

# Connection pool: enough for the engine's parallel uploads and readers.
MAX_POOL_CONNECTIONS = 32
CONNECT_TIMEOUT = 5.0
READ_TIMEOUT = 60.0


class S3Store(Store):
    def __init__(self, bucket: str, prefix: str = "", endpoint_url: str | None = None, *,
                 region: str | None = None, max_pool_connections: int = MAX_POOL_CONNECTIONS,
                 connect_timeout: float = CONNECT_TIMEOUT, read_timeout: float = READ_TIMEOUT):
        if not bucket or "/" in bucket:
            raise StoreError(f"bad S3 bucket name {bucket!r}", errno.EINVAL)
        self.bucket = bucket
        prefix = prefix.strip("/")
        self.prefix = prefix + "/" if prefix else ""
        self.url = f"s3://{bucket}/{prefix}" if prefix else f"s3://{bucket}"
        self.endpoint_url = (endpoint_url or os.environ.get("AWS_ENDPOINT_URL_S3")
                             or os.environ.get("AWS_ENDPOINT_URL") or None)
        config = botocore.config.Config(
            max_pool_connections=max_pool_connections,
            connect_timeout=connect_timeout,
            read_timeout=read_timeout,
            retries={"total_max_attempts": 1, "mode": "standard"},
            tcp_keepalive=True,
            s3={"addressing_style": "path"} if self.endpoint_url else None,
        )
        try:
            session = boto3.session.Session()
            if region is None and session.region_name is None and self.endpoint_url:
                region = "us-east-1"  # any region signs for an S3-compatible server
            self._client = session.client("s3", endpoint_url=self.endpoint_url,
                                          region_name=region, config=config)
        except (botocore.exceptions.BotoCoreError, ValueError) as e:
            raise StoreError(f"cannot set up S3 access to bucket {bucket!r}: {e}") from e
        # Set once a HEAD of the bucket succeeded: a bare 404 on a HEAD of a
        # key can then only mean "no such key".
        self._bucket_ok = False
        self._lock = threading.Lock()

    # --- helpers ---------------------------------------------------------------

    def _key(self, key: str) -> str:
        if not key or key.startswith("/") or ".." in key.split("/"):
            raise ValueError(f"bad object key: {key!r}")
        return self.prefix + key

    def _where(self) -> str:
        where = f"bucket {self.bucket!r}"
        if self.endpoint_url:
            where += f" at {self.endpoint_url}"
        return where

    def _error(self, e: Exception, op: str, key: str | None) -> StoreError:
        """Translate a boto3/botocore exception into the store's error hierarchy."""
        what = f"{op} {key}" if key is not None else op
        if isinstance(e, botocore.exceptions.ClientError):
            err = e.response.get("Error", {}) or {}
            code = str(err.get("Code", ""))
            status = e.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0
            message = err.get("Message") or code or f"HTTP {status}"
            if code == "NoSuchBucket":
                return StoreError(f"S3 {self._where()} does not exist", errno.ENOENT)
            if code in _ACCESS_CODES or status == 403:
                return StoreError(
                    f"S3 access denied to {self._where()} ({code or status}): "
                    "check the AWS credentials/profile and the bucket policy", errno.EACCES)
            if code in _NOT_FOUND_CODES or status == 404:
                return ObjectNotFound(key if key is not None else op)
            if code in _TRANSIENT_CODES or status >= 500 or status in (408, 409, 429):
                return TransientStoreError(f"S3 {what} in {self._where()}: {code or status}: {message}")
            return StoreError(f"S3 {what} in {self._where()}: {code or status}: {message}")
        if isinstance(e, botocore.exceptions.SSLError):
            return StoreError(f"TLS failure talking to S3 for {self._where()}: {e}")
        if isinstance(e, (botocore.exceptions.EndpointConnectionError,
                          botocore.exceptions.ConnectTimeoutError)):
            return TransientStoreError(f"cannot reach S3 endpoint for {self._where()}: {e}")
        if isinstance(e, (botocore.exceptions.ConnectionError,
                          botocore.exceptions.HTTPClientError,
                          botocore.exceptions.IncompleteReadError)):
            return TransientStoreError(f"S3 {what} in {self._where()}: connection failed: {e}")
        if isinstance(e, (botocore.exceptions.NoCredentialsError,
                          botocore.exceptions.PartialCredentialsError)):
            return StoreError(f"no usable AWS credentials for S3 {self._where()}: set "
                              "AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or AWS_PROFILE", errno.EACCES)
        if isinstance(e, botocore.exceptions.BotoCoreError):
            return StoreError(f"S3 {what} in {self._where()}: {e}")
        if isinstance(e, OSError):  # a socket error that escaped botocore's wrapping
            return TransientStoreError(f"S3 {what} in {self._where()}: {e}")
        raise e

    # --- the Store interface ---------------------------------------------------------

    def put(self, key: str, data: bytes, *, exclusive: bool = False) -> None:
        kwargs = {"Bucket": self.bucket, "Key": self._key(key), "Body": bytes(data)}
        if exclusive:
            kwargs["IfNoneMatch"] = "*"
        try:
            self._client.put_object(**kwargs)
        except Exception as e:
            if exclusive and isinstance(e, botocore.exceptions.ClientError):
                err = e.response.get("Error", {}) or {}
                status = e.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
                if err.get("Code") == "PreconditionFailed" or status == 412:
                    raise ObjectExists(key) from None
            raise self._error(e, "put", key) from e

    def get(self, key: str, start: int = 0, length: int | None = None) -> bytes:
        full_key = self._key(key)
        if start < 0:
            if length is not None:
                raise ValueError("a suffix read takes no length")
            byte_range = f"bytes={start}"  # bytes=-N: the last N bytes
        elif length is not None:
            if length < 0:
                raise ValueError(f"negative length {length}")
            if length == 0:
                self.head(key)  # still report a missing object
                return b""
            byte_range = f"bytes={start}-{start + length - 1}"
        elif start > 0:
            byte_range = f"bytes={start}-"
        else:
            byte_range = None
        kwargs = {"Bucket": self.bucket, "Key": full_key}
        if byte_range:
            kwargs["Range"] = byte_range
        try:
            response = self._client.get_object(**kwargs)
            data = response["Body"].read()
        except botocore.exceptions.ClientError as e:
            code = (e.response.get("Error", {}) or {}).get("Code")
            status = e.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
            if code == "InvalidRange" or status == 416:
                # The range starts at or past the end (or the object is empty):
                # like a file read, that is no bytes, not an error.
                return b""
            raise self._error(e, "get", key) from e
        except Exception as e:
            raise self._error(e, "get", key) from e
        if byte_range and not response.get("ContentRange"):
            # The server ignored the Range header and sent the whole object.
            if start < 0:
                data = data[start:]
            else:
                data = data[start:] if length is None else data[start:start + length]
        return data

    def head(self, key: str) -> int:
        try:
            response = self._client.head_object(Bucket=self.bucket, Key=self._key(key))
            return int(response["ContentLength"])
        except Exception as e:  # noqa: BLE001 - translated
            error = self._error(e, "head", key)
        if isinstance(error, ObjectNotFound) and not self._bucket_ok:
            # A HEAD gets a bare 404 for a missing bucket too: tell them apart once.
            self._check_bucket()
        raise error

    def _check_bucket(self) -> None:
        try:
            self._client.head_bucket(Bucket=self.bucket)
        except botocore.exceptions.ClientError as e:
            status = e.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
            if status == 404:
                raise StoreError(f"S3 {self._where()} does not exist", errno.ENOENT) from None
            raise self._error(e, "head-bucket", None) from e
        except Exception as e:
            raise self._error(e, "head-bucket", None) from e
        with self._lock:
            self._bucket_ok = True

    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        found = []
        strip = len(self.prefix)
        try:
            paginator = self._client.get_paginator("list_objects_v2")
            for page in paginator.paginate(Bucket=self.bucket, Prefix=self.prefix + prefix):
                for item in page.get("Contents", ()):
                    found.append(ObjectInfo(item["Key"][strip:], int(item["Size"])))
        except Exception as e:
            raise self._error(e, "list", prefix or "/") from e
        found.sort()
        return iter(found)

    def delete(self, key: str) -> None:
        try:
            self._client.delete_object(Bucket=self.bucket, Key=self._key(key))
        except Exception as e:
            error = self._error(e, "delete", key)
            if isinstance(error, ObjectNotFound):
                return  # already gone
            raise error from e

    def close(self) -> None:
        close = getattr(self._client, "close", None)
        if close is not None:
            close()
