"""`s3://bucket/prefix`: a store in an S3 bucket or any S3-compatible service.

This is the only module that imports boto3's botocore (the low-level client
is all it needs: boto3 itself and its transfer manager cost a tenth of a
second to import, at every start).  One client is shared by every thread
(clients are thread-safe); botocore's own retries
are switched off because RetryingStore retries TransientStoreError with its own
backoff, and two layers of retries would multiply each other.

Objects live under `prefix/` in the bucket; every key the Store interface sees
or returns is relative to that prefix.

Conditional create (put(exclusive=True)) sends `If-None-Match: *`: S3 answers
412 PreconditionFailed when the key exists (-> ObjectExists), or 409
ConditionalRequestConflict while a concurrent write to the same key is in
progress (-> TransientStoreError: a retry gets a definite answer).  Servers
that ignore the header (found by a probe before the first exclusive put)
get a HEAD before the put instead; see Store.conditional_writes.

Only what every S3 server does is relied on: ranged answers are checked
against their Content-Range (or taken as the whole object without one) and
what they lack is asked for again; PUT bodies carry checksums only where an
operation requires them when the endpoint is not AWS (_default_checksums).

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
import logging
import os
import sys
import threading
from typing import Iterator
from urllib.parse import urlparse

from lsbd.errors import ObjectExists, ObjectNotFound, StoreError, TransientStoreError
from lsbd.store.base import ObjectInfo, Store


def _import_botocore() -> None:
    """Import botocore without urllib3's pyOpenSSL shim.  botocore's
    httpsession imports urllib3.contrib.pyopenssl only to get back the
    standard library's SSLContext (which it falls back to without it); with
    pyOpenSSL installed (lsbd's NBD TLS uses it) that import loads OpenSSL
    and cryptography's x509, about 50 ms of every `lsbd` start that talks to
    S3.  The block is lifted once botocore is in, so other code can still
    import the shim."""
    shim = "urllib3.contrib.pyopenssl"
    blocked = shim not in sys.modules
    if blocked:
        sys.modules[shim] = None    # type: ignore[assignment]  # import raises ImportError
    try:
        import botocore.httpsession  # noqa: F401
    finally:
        if blocked and sys.modules.get(shim, 0) is None:
            del sys.modules[shim]


_import_botocore()
import botocore.config  # noqa: E402
import botocore.exceptions  # noqa: E402
import botocore.loaders  # noqa: E402
import botocore.session  # noqa: E402
import botocore.utils  # noqa: E402

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

log = logging.getLogger(__name__)

#: Each process loads botocore's description of S3 once: a client of a
#: session that has to load it takes about 0.1 s, one that finds it 5-10 ms.
#: The sessions (credentials, profile, region) stay one per store.
_loader: "_S3Loader | None" = None
_loader_lock = threading.Lock()
#: (endpoint, bucket) -> whether the server honours conditional creates.
_conditional_known: dict[tuple[str | None, str], bool] = {}


class _S3Loader(botocore.loaders.Loader):
    """botocore's loader for a process whose clients are all S3 clients.
    To check that a service exists, botocore's own lists every service it
    describes: some 450 folders, each listed (about 900 directory reads,
    20 ms warm and far more from a cold disk, at every start).  S3's own
    files are found as before (its latest API version, its extras)."""

    def list_available_services(self, type_name: str) -> list[str]:
        return ["s3"]


def _session() -> botocore.session.Session:
    global _loader
    session = botocore.session.Session()
    with _loader_lock:
        if _loader is None:
            # AWS_DATA_PATH as botocore.loaders.create_loader reads it.
            paths = session.get_config_variable("data_path")
            _loader = _S3Loader(extra_search_paths=[
                os.path.expanduser(os.path.expandvars(p))
                for p in (paths.split(os.pathsep) if paths else [])])
        session.register_component("data_loader", _loader)
    return session


#: A PUT body at least this large asks the server first (`Expect:
#: 100-continue`), so that a refused request does not send it; a smaller one
#: goes with its headers.  botocore asks for every PutObject, and waiting
#: for the server's "100 Continue" is a round trip more per PUT (the lease's
#: 44 ms at 10 ms one-way, 24 ms without; docs/distant.md).  2 MiB, as AWS's
#: own Go and Kotlin SDKs do.
EXPECT_CONTINUE_MIN = 2 << 20


def _is_large_transfer(operation: str, params) -> bool:
    """A PUT of a body, or a ranged GET, of more than LARGE_TRANSFER bytes."""
    if operation == "PutObject":
        length = botocore.utils.determine_content_length(params.get("body"))
        return length is None or length > LARGE_TRANSFER
    if operation == "GetObject":
        first, _, last = str(params["headers"].get("Range", "")).removeprefix("bytes=") \
            .partition("-")
        # bytes=A-B; bytes=-N (a suffix: an index) and no Range (a whole
        # object: its bytes come as soon as the server finds it) are small.
        return first.isdigit() and (not last.isdigit() or
                                    int(last) - int(first) + 1 > LARGE_TRANSFER)
    return False


def _expect_continue_only_for_large_bodies(params, **kwargs) -> None:
    """botocore's before-call hook, run after its own that asks every PUT
    to wait for "100 Continue": take that back for a small body."""
    if "Expect" not in params["headers"]:
        return
    length = botocore.utils.determine_content_length(params.get("body"))
    if length is not None and length < EXPECT_CONTINUE_MIN:
        del params["headers"]["Expect"]


# Connection pool: enough for the engine's parallel uploads and readers.
MAX_POOL_CONNECTIONS = 32
CONNECT_TIMEOUT = 5.0
#: The scratch key of the conditional-write probe (outside volumes/).
PROBE_KEY = ".lsbd-probe/conditional-create"
#: How long a large transfer (a PUT body, or a ranged GET, of more than
#: LARGE_TRANSFER bytes: segments) waits for the server's next byte.  After
#: a large body the server answers only once it has stored all of it.
READ_TIMEOUT = 60.0
#: How long every other request waits for the server's next byte: HEAD,
#: LIST, DELETE, small PUTs and GETs (config, lease, keys, snapshots, a
#: segment's index), and GETs of whole objects, which a server starts
#: sending as soon as it finds them.  A healthy server answers these in
#: milliseconds (AWS advises retrying a small request after 2 s), so a store
#: that takes requests and never answers fails a one-shot command's attempt
#: in seconds, not at READ_TIMEOUT (docs/operations.md).
SMALL_READ_TIMEOUT = 5.0
LARGE_TRANSFER = 1 << 20


class S3Store(Store):
    #: Its listing gives each object's ETag (ObjectInfo.etag).
    lists_etags = True

    def __init__(self, bucket: str, prefix: str = "", endpoint_url: str | None = None, *,
                 region: str | None = None, max_pool_connections: int = MAX_POOL_CONNECTIONS,
                 connect_timeout: float = CONNECT_TIMEOUT, read_timeout: float = READ_TIMEOUT,
                 small_read_timeout: float = SMALL_READ_TIMEOUT, checksums: str | None = None,
                 conditional_writes: bool | None = None):
        if not bucket or "/" in bucket:
            raise StoreError(f"bad S3 bucket name {bucket!r}", errno.EINVAL)
        self.bucket = bucket
        prefix = prefix.strip("/")
        self.prefix = prefix + "/" if prefix else ""
        self.url = f"s3://{bucket}/{prefix}" if prefix else f"s3://{bucket}"
        self.endpoint_url = (endpoint_url or os.environ.get("AWS_ENDPOINT_URL_S3")
                             or os.environ.get("AWS_ENDPOINT_URL") or None)
        try:
            session = _session()
        except (botocore.exceptions.BotoCoreError, ValueError) as e:
            raise StoreError(f"cannot set up S3 access to bucket {bucket!r}: {e}") from e
        self.checksums = checksums or _default_checksums(self.endpoint_url, session)
        config = botocore.config.Config(
            request_checksum_calculation=self.checksums,  # type: ignore[arg-type]
            max_pool_connections=max_pool_connections,
            connect_timeout=connect_timeout,
            read_timeout=read_timeout,
            retries={"total_max_attempts": 1, "mode": "standard"},
            tcp_keepalive=True,
            s3={"addressing_style": "path"} if self.endpoint_url else None,
        )
        try:
            if region is None and session.get_config_variable("region") is None \
                    and self.endpoint_url:
                region = "us-east-1"  # any region signs for an S3-compatible server
            self._client = session.create_client("s3", endpoint_url=self.endpoint_url,
                                                 region_name=region, config=config)
        except (botocore.exceptions.BotoCoreError, ValueError) as e:
            raise StoreError(f"cannot set up S3 access to bucket {bucket!r}: {e}") from e
        self._client.meta.events.register_last("before-call.s3",
                                               _expect_continue_only_for_large_bodies)
        self._small_read_timeout = min(small_read_timeout, read_timeout)
        self._client.meta.events.register("before-call.s3", self._shorter_wait_when_small)
        # Set once a HEAD of the bucket succeeded: a bare 404 on a HEAD of a
        # key can then only mean "no such key".
        self._bucket_ok = False
        self._lock = threading.Lock()
        if checksums not in (None, "when_required", "when_supported"):
            raise StoreError(f"bad S3 checksum setting {checksums!r}: when_required or "
                             "when_supported", errno.EINVAL)
        # None: not known yet; found out by a probe before the first exclusive put.
        self._conditional: bool | None = conditional_writes
        self._probe_lock = threading.Lock()

    @property
    def conditional_writes(self) -> bool:
        """Whether the server honours If-None-Match: * on PUT (AWS, MinIO and
        moto do; s3rver and many gateways ignore it and overwrite).  Probed
        once per process and bucket, with conditional creates of a scratch
        key (a mount's serving process inherits what its parent found)."""
        with self._probe_lock:
            if self._conditional is None:
                server = (self.endpoint_url, self.bucket)
                known = _conditional_known.get(server)
                self._conditional = known if known is not None \
                    else self._probe_conditional_writes()
                _conditional_known[server] = self._conditional
            return self._conditional

    def _probe_conditional_writes(self) -> bool:
        """The scratch key stays (it is one byte): once it exists, one
        refused create answers, a single round trip on every later open.
        Only a server that honours the condition ever refuses, so two
        processes probing at once both find the truth."""
        for _attempt in range(2):
            try:
                self._put(PROBE_KEY, b"1", conditional=True)
            except ObjectExists:
                return True
        log.info("S3 %s ignores conditional writes (If-None-Match); lsbd checks for "
                 "existing objects and its lease by reading instead", self._where())
        return False

    def _shorter_wait_when_small(self, params, model, **kwargs) -> None:
        """botocore's before-call hook: a request that is not a large
        transfer waits SMALL_READ_TIMEOUT for the server, not READ_TIMEOUT
        (botocore's per-request read timeout, from 1.43.68)."""
        if not _is_large_transfer(model.name, params):
            params["context"]["read_timeout"] = self._small_read_timeout

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
        if exclusive and not self.conditional_writes:
            # The server would overwrite: look first.  Two creators racing
            # inside one round trip can both pass; the engine's lease and its
            # segment chain keep a second writer out of the volume anyway.
            if self.exists(key):
                raise ObjectExists(key)
            exclusive = False
        self._put(key, data, conditional=exclusive)

    def _put(self, key: str, data: bytes, *, conditional: bool) -> None:
        kwargs = {"Bucket": self.bucket, "Key": self._key(key), "Body": bytes(data)}
        if conditional:
            kwargs["IfNoneMatch"] = "*"
        try:
            self._client.put_object(**kwargs)
        except Exception as e:
            if conditional and isinstance(e, botocore.exceptions.ClientError):
                err = e.response.get("Error", {}) or {}
                status = e.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
                if err.get("Code") == "PreconditionFailed" or status == 412:
                    raise ObjectExists(key) from None
            raise self._error(e, "put", key) from e

    def get(self, key: str, start: int = 0, length: int | None = None) -> bytes:
        """See Store.get.  Every ranged answer is checked against what was
        asked: S3-compatible servers differ (s3rver answers a suffix range
        with the object's head, and `bytes=0-0` with the whole object; a
        plain web server or proxy may ignore Range altogether), so the bytes
        returned are located by the answer's Content-Range, and whatever it
        lacks is asked for again with an explicit range."""
        if start < 0 and length is not None:
            raise ValueError("a suffix read takes no length")
        if length is not None and length < 0:
            raise ValueError(f"negative length {length}")
        if length == 0:
            self.head(key)  # still report a missing object
            return b""
        if start == 0 and length is None:
            return self._get_range(key, None)[0]
        if start < 0:
            first = f"bytes={start}"  # bytes=-N: the last N bytes
        elif length is None:
            first = f"bytes={start}-"
        else:
            first = f"bytes={start}-{start + length - 1}"
        data, at, total = self._get_range(key, first)
        if total is None:
            return b""        # the range starts at or past the end: no bytes
        if start < 0:
            want_start, want_end = max(0, total + start), total
        else:
            want_start = start
            want_end = total if length is None else min(total, start + length)
        if want_start >= want_end:
            return b""
        parts = []
        pos = want_start
        for _attempt in range(3):
            if at <= pos < at + len(data):
                piece = data[pos - at:want_end - at]
                parts.append(piece)
                pos += len(piece)
            if pos >= want_end:
                return parts[0] if len(parts) == 1 else b"".join(parts)
            # Short, or not the bytes asked for: ask for the rest explicitly.
            data, at, total2 = self._get_range(key, f"bytes={pos}-{want_end - 1}")
            if total2 != total:
                raise TransientStoreError(f"S3 get {key} in {self._where()}: the object "
                                          "changed size while it was read")
        # A server that will not give the range at all: the whole object.
        data, _at, _total = self._get_range(key, None)
        return data[want_start:want_end]

    def _get_range(self, key: str, byte_range: str | None) -> tuple[bytes, int, int | None]:
        """One GET: (the bytes, the object offset they start at, the object's
        size), the size None when the range is not satisfiable."""
        kwargs = {"Bucket": self.bucket, "Key": self._key(key)}
        if byte_range:
            kwargs["Range"] = byte_range
        try:
            response = self._client.get_object(**kwargs)
        except botocore.exceptions.ClientError as e:
            code = (e.response.get("Error", {}) or {}).get("Code")
            status = e.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
            if byte_range and (code == "InvalidRange" or status == 416):
                # The range starts at or past the end (or the object is empty):
                # like a file read, that is no bytes, not an error.
                return b"", 0, None
            raise self._error(e, "get", key) from e
        except Exception as e:
            raise self._error(e, "get", key) from e
        content_range = _parse_content_range(response.get("ContentRange"))
        body = response["Body"]
        if content_range is not None and content_range[2] == 0:
            # An empty object: some servers announce a byte they never send.
            body.close()
            return b"", 0, None
        try:
            data = body.read()
        except Exception as e:
            raise self._error(e, "get", key) from e
        if content_range is None:     # 200: the whole object, whatever the Range said
            return data, 0, len(data)
        first, last, total = content_range
        if len(data) != last - first + 1:
            raise TransientStoreError(f"S3 get {key} in {self._where()}: {len(data)} bytes for "
                                      f"range {first}-{last}")
        return data, first, (total if total is not None else first + len(data))

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
                    key = item["Key"][strip:]
                    if key != PROBE_KEY:   # the store's own scratch object
                        found.append(ObjectInfo(key, int(item["Size"]), item.get("ETag") or ""))
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


def _parse_content_range(value: str | None) -> tuple[int, int, int | None] | None:
    """`bytes FIRST-LAST/TOTAL` (TOTAL may be `*`) -> (first, last, total)."""
    if not value:
        return None
    try:
        unit, _, spec = value.strip().partition(" ")
        span, _, total = spec.partition("/")
        first, _, last = span.partition("-")
        if unit.lower() != "bytes":
            raise ValueError(value)
        return int(first), int(last), (None if total.strip() == "*" else int(total))
    except ValueError:
        raise TransientStoreError(f"S3 sent a Content-Range it cannot mean: {value!r}") from None


def _default_checksums(endpoint_url: str | None,
                       session: botocore.session.Session | None = None) -> str:
    """boto3 1.36+ sends PUT bodies as aws-chunked with a trailing checksum;
    S3-compatible servers often refuse that (411 MissingContentLength over
    HTTPS).  So against any endpoint that is not AWS, checksums are sent
    only where an operation requires them, unless the AWS setting
    (AWS_REQUEST_CHECKSUM_CALCULATION, or the profile's
    request_checksum_calculation) says otherwise.  session: the store's
    own (a second botocore session costs about 10 ms of every start)."""
    configured = os.environ.get("AWS_REQUEST_CHECKSUM_CALCULATION")
    if not configured:
        try:
            configured = (session or _session()).get_scoped_config().get(
                "request_checksum_calculation")
        except botocore.exceptions.BotoCoreError:
            configured = None
    if configured:
        return str(configured).lower()
    if endpoint_url is None or _is_aws(endpoint_url):
        return "when_supported"
    return "when_required"


def _is_aws(endpoint_url: str) -> bool:
    host = (urlparse(endpoint_url).hostname or "").lower()
    return host.endswith(".amazonaws.com") or host.endswith(".amazonaws.com.cn")
