"""Real servers on loopback for the remote-store tests, on ephemeral ports, stopped by the tests.

- S3: moto's standalone server (`moto[server]`, an S3-compatible HTTP API), reached through
  s3fs exactly as a user's bucket would be.
- HTTP: a static file server honouring Range requests, including the suffix ranges
  ("bytes=-N") that Zarr's sharding reads shard indexes with. Python's http.server ignores
  Range altogether; werkzeug's `send_file(conditional=True)` implements RFC 9110 ranges, so
  the server here is a few lines of WSGI around it. It records the Range headers it answered.
"""

from __future__ import annotations

import logging
import threading
from contextlib import contextmanager
from pathlib import Path

from werkzeug.exceptions import NotFound
from werkzeug.serving import make_server
from werkzeug.utils import safe_join, send_file
from werkzeug.wrappers import Request

# s3fs/botocore options that keep a test from hanging on a server that stopped answering
S3_CLIENT = {"connect_timeout": 5, "read_timeout": 20, "retries": {"max_attempts": 2}}

logging.getLogger("werkzeug").setLevel(logging.ERROR)  # no line per request


@contextmanager
def s3_server():
    """An S3-compatible server on 127.0.0.1; yields the fsspec storage options that reach it."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    try:
        yield {
            "key": "testing",
            "secret": "testing",
            "skip_instance_cache": True,
            "client_kwargs": {"endpoint_url": f"http://{host}:{port}"},
            "config_kwargs": S3_CLIENT,
        }
    finally:
        server.stop()


class StaticFiles:
    """WSGI app: GET/HEAD of the files under `root`, with Range support; no directory listings."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self.ranges: list[str] = []  # Range headers of the requests answered

    def __call__(self, environ, start_response):
        request = Request(environ)
        try:
            path = safe_join(str(self.root), request.path.lstrip("/"))
            if path is None or not Path(path).is_file():
                raise NotFound()
            if "Range" in request.headers:
                self.ranges.append(request.headers["Range"])
            response = send_file(path, environ, conditional=True, etag=True, max_age=0)
        except NotFound as e:
            response = e.get_response(environ)
        return response(environ, start_response)


@contextmanager
def http_server(root: Path):
    """A static HTTP server for `root` on 127.0.0.1; yields (base URL, the app with its Range log)."""
    app = StaticFiles(root)
    server = make_server("127.0.0.1", 0, app, threaded=True)
    server.timeout = 10
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.port}", app
    finally:
        server.shutdown()
        thread.join(timeout=10)
