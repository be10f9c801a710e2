"""A real S3 API on 127.0.0.1 for the object-store tests: moto's server mode.

``s3_server`` starts moto's S3-compatible HTTP server as a process, bound to 127.0.0.1
on a free port, once per test session, and stops it at the end. Every request goes over
HTTP to that port through s3fs/aiobotocore, exactly as to AWS or MinIO: nothing of
s3fs is mocked. The endpoint reaches botocore (in this process and in subprocesses) the
standard way, through ``AWS_ENDPOINT_URL`` and dummy credentials. Each test makes its
own bucket (``s3_bucket``).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator

import pytest

S3_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The endpoint URL of a local S3 server (session-wide; bounded start-up time).

    The server runs in its own process (moto's ``moto.server`` command line), so it
    answers requests at full speed while the test process computes, and is stopped
    (terminated, then killed) when the session ends.
    """
    pytest.importorskip("s3fs", reason="the s3 extra (pip install 'xtd[s3]') is not installed")
    pytest.importorskip("moto.server", reason="moto[server] is not installed")
    port = _free_port()
    log = tmp_path_factory.mktemp("s3") / "server.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
            stdout=out, stderr=subprocess.STDOUT, env={**os.environ, **S3_ENV},
        )  # fmt: skip
    endpoint = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:  # wait until it accepts connections
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    pytest.fail("the local S3 server did not start within 60 s: " + log.read_text()[-2000:])
                time.sleep(0.05)
        saved = {k: os.environ.get(k) for k in (*S3_ENV, "AWS_ENDPOINT_URL")}
        os.environ.update(S3_ENV, AWS_ENDPOINT_URL=endpoint)
        try:
            yield endpoint
        finally:
            for key, value in saved.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture
def s3_bucket(s3_server: str) -> str:
    """A new, empty bucket on the local server: its name."""
    import s3fs

    name = f"xtd-{uuid.uuid4().hex[:12]}"
    s3fs.S3FileSystem(skip_instance_cache=True).mkdir(name)
    return name


def s3_fs():
    """A fresh s3fs filesystem on the local server (no listing cache from earlier calls)."""
    import s3fs

    return s3fs.S3FileSystem(skip_instance_cache=True)
