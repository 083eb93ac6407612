"""An s3:// source against a real S3-protocol server: moto's standalone server, started here on a loopback port.
The client is pyarrow's own S3 filesystem (what the jobs use); credentials come from the environment only."""

from __future__ import annotations

import os
import signal
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest

from fixtures.net import free_port
from recupdate_workloads.data.errors import DataError
from recupdate_workloads.data.sources import DataConfig
from recupdate_workloads.store.db import Store
from recupdate_workloads.store.sync import sync

REPO = Path(__file__).resolve().parents[2]
# Installed by `make tools` (scripts/fetch-s3-server.sh) in a venv of its own.
SERVER_BIN = Path(os.environ.get("RECUPDATE_MOTO_BIN", REPO / ".tools" / "s3-server" / "bin"))
KEY, SECRET, REGION = "AKIDTEST", "secret-test-key", "us-east-1"


@pytest.fixture(scope="module")
def s3_server() -> Iterator[str]:
    if not (SERVER_BIN / "moto_server").exists():
        pytest.skip(f"moto_server not installed in {SERVER_BIN}: run `make tools`")
    port = free_port()
    proc = subprocess.Popen(
        [str(SERVER_BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=1).close()
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("moto_server did not start") from None
                time.sleep(0.2)
        yield f"127.0.0.1:{port}"
    finally:
        os.kill(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()


def _make_bucket(endpoint: str, bucket: str) -> None:
    """With boto3, from the server's venv (botocore cannot share the project's venv: see the requirements file)."""
    code = (
        "import boto3, sys; boto3.client('s3', endpoint_url=sys.argv[1], aws_access_key_id=sys.argv[2],"
        " aws_secret_access_key=sys.argv[3], region_name=sys.argv[4]).create_bucket(Bucket=sys.argv[5])"
    )
    subprocess.run(
        [str(SERVER_BIN / "python"), "-c", code, f"http://{endpoint}", KEY, SECRET, REGION, bucket],
        check=True,
        timeout=60,
    )


def _client(endpoint: str) -> pafs.S3FileSystem:
    return pafs.S3FileSystem(
        endpoint_override=endpoint, scheme="http", access_key=KEY, secret_key=SECRET, region=REGION
    )


def _events(n: int, first: int = 0) -> pa.Table:
    i = np.arange(first, first + n)
    return pa.table(
        {"user": [f"u{k % 7}" for k in i], "item": [f"i{k % 5}" for k in i], "ts": 1_700_000_000 + i, "weight": i % 3}
    )


def test_s3_dataset_is_ingested_once_per_file(s3_server: str, store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    _make_bucket(s3_server, "events")
    fs = _client(s3_server)
    with fs.open_output_stream("events/catalogue/items.csv") as f:
        f.write(b"item,cluster\n" + b"".join(f"i{k},c{k % 2}\n".encode() for k in range(5)))
    pq.write_table(_events(1000), "events/clicks/date=2030-01-01/part-0.parquet", filesystem=fs)
    pq.write_table(_events(500, 1000), "events/clicks/date=2030-01-02/part-0.parquet", filesystem=fs)
    # Credentials from the environment only, as a Secret puts them there in a job's pod.
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", KEY)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    cfg = DataConfig.parse(
        {
            "interactions": "s3://events/clicks/",
            "items": "s3://events/catalogue/items.csv",
            "objectStorage": {"endpoint": s3_server, "scheme": "http", "region": REGION},
        }
    )
    r = sync(store, cfg, embed=False)
    assert (r.interactions.new, r.files, r.catalogue.items, r.catalogue.clusters) == (1500, 3, 5, 2)
    with store.tx() as c:
        uris = [u for (u,) in c.execute("SELECT uri FROM ingest_files ORDER BY uri").fetchall()]
    assert uris == [
        "s3://events/catalogue/items.csv",
        "s3://events/clicks/date=2030-01-01/part-0.parquet",
        "s3://events/clicks/date=2030-01-02/part-0.parquet",
    ]
    assert sync(store, cfg, embed=False).interactions.rows == 0
    pq.write_table(_events(250, 1500), "events/clicks/date=2030-01-03/part-0.parquet", filesystem=fs)
    third = sync(store, cfg, embed=False)
    assert (third.interactions.new, third.files) == (250, 1)
    # A bucket that does not exist: one clear error naming the source, nothing written.
    bad = DataConfig.parse(
        {"interactions": "s3://no-such-bucket/x/", "objectStorage": {"endpoint": s3_server, "scheme": "http"}}
    )
    with pytest.raises(DataError, match=r"^s3://no-such-bucket/x/: "):
        sync(store, bad, embed=False)
    with store.tx() as c:
        assert c.execute("SELECT count(*) FROM interactions").fetchone() == (1750,)
