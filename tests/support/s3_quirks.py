"""WSGI middleware for the test moto server: buckets that behave like the
S3-compatible servers lsbd must work with, picked by the bucket's name.

  lsbd-norange-...   Range headers are ignored: every GET sends the whole
                     object with 200 (a plain web server or proxy does that)
  lsbd-shortrange-...  a ranged GET gets only the first half of the range it
                     asked for (at least one byte), with a Content-Range that
                     says so
  lsbd-nocond-...    If-None-Match is ignored: a conditional create overwrites
                     (s3rver and many gateways do that)
"""

from __future__ import annotations

import re

NO_RANGE = "lsbd-norange-"
SHORT_RANGE = "lsbd-shortrange-"
NO_CONDITIONAL = "lsbd-nocond-"

_CONTENT_RANGE = re.compile(r"bytes (\d+)-(\d+)/(\d+|\*)")


class S3Quirks:
    def __init__(self, app):
        self.app = app

    def __call__(self, environ, start_response):
        bucket = environ.get("PATH_INFO", "").lstrip("/").split("/", 1)[0]
        if bucket.startswith(NO_RANGE):
            environ.pop("HTTP_RANGE", None)
        elif bucket.startswith(NO_CONDITIONAL):
            environ.pop("HTTP_IF_NONE_MATCH", None)
        elif bucket.startswith(SHORT_RANGE) and environ.get("HTTP_RANGE"):
            return self._short(environ, start_response)
        return self.app(environ, start_response)

    def _short(self, environ, start_response):
        seen = {}

        def capture(status, headers, exc_info=None):
            seen["status"], seen["headers"] = status, headers
            return lambda data: None

        body = b"".join(self.app(environ, capture))
        status, headers = seen["status"], seen["headers"]
        match = None
        for name, value in headers:
            if name.lower() == "content-range":
                match = _CONTENT_RANGE.fullmatch(value.strip())
        if status.startswith("206") and match and len(body) > 1:
            first, total = int(match.group(1)), match.group(3)
            body = body[:max(1, len(body) // 2)]
            headers = [(n, v) for n, v in headers
                       if n.lower() not in ("content-range", "content-length")]
            headers += [("Content-Range", f"bytes {first}-{first + len(body) - 1}/{total}"),
                        ("Content-Length", str(len(body)))]
        start_response(status, headers)
        return [body]
