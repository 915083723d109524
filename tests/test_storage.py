"""Storage URIs: local and a real S3 API (moto_server on loopback)."""

from pathlib import Path

import pytest

from laion_tasks import storage


@pytest.fixture(params=["local", "s3"])
def root(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "local":
        return str(tmp_path / "root")
    return request.getfixturevalue("s3_root")


def test_roundtrip_and_listing(root: str) -> None:
    uri = storage.join(root, "snap", "a", "x.bin")
    storage.write_bytes(uri, b"hello")
    storage.write_bytes(storage.join(root, "snap", "b.parquet"), b"p")
    assert storage.exists(uri)
    assert storage.read_bytes(uri) == b"hello"
    assert storage.size(uri) == 5
    listed = storage.list_uris(storage.join(root, "snap"))
    assert listed == sorted([uri, storage.join(root, "snap", "b.parquet")])
    assert storage.list_uris(storage.join(root, "snap"), ".parquet") == [storage.join(root, "snap", "b.parquet")]
    with storage.local_copy(uri) as path:
        assert Path(path).read_bytes() == b"hello"
    storage.delete(uri)
    assert not storage.exists(uri)


def test_failed_write_leaves_nothing(root: str) -> None:
    uri = storage.join(root, "snap", "half.parquet")
    with pytest.raises(RuntimeError):
        with storage.open_write(uri) as handle:
            handle.write(b"partial")
            raise RuntimeError("killed mid-write")
    assert not storage.exists(uri)
    assert storage.list_uris(storage.join(root, "snap")) == []


def test_failed_rewrite_keeps_previous_version(root: str) -> None:
    uri = storage.join(root, "v.bin")
    storage.write_bytes(uri, b"v1")
    with pytest.raises(ValueError):
        with storage.atomic_local_path(uri) as tmp:
            tmp.write_bytes(b"v2-partial")
            raise ValueError("boom")
    assert storage.read_bytes(uri) == b"v1"


def test_large_object_uses_multipart(s3_root: str) -> None:
    uri = storage.join(s3_root, "big.bin")
    data = bytes(range(256)) * (40 * 1024 * 4)  # 40 MiB: above boto3's 8 MB multipart threshold
    storage.write_bytes(uri, data)
    assert storage.size(uri) == len(data)
    loc = storage.parse_s3(uri)
    head = storage.s3_client().head_object(Bucket=loc.bucket, Key=loc.key)
    assert "-" in head["ETag"], "a multipart upload's ETag carries a part count"


def test_missing_object_error_names_uri(root: str) -> None:
    uri = storage.join(root, "nope.parquet")
    with pytest.raises(storage.StorageError, match="nope.parquet"):
        storage.read_bytes(uri)


def test_http_read(tmp_path: Path) -> None:
    import http.server
    import threading
    from functools import partial

    (tmp_path / "f.txt").write_bytes(b"over http")
    handler = partial(http.server.SimpleHTTPRequestHandler, directory=str(tmp_path))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        assert storage.read_bytes(f"http://127.0.0.1:{server.server_port}/f.txt") == b"over http"
        with pytest.raises(storage.StorageError, match="missing.txt"):
            storage.read_bytes(f"http://127.0.0.1:{server.server_port}/missing.txt")
    finally:
        server.shutdown()
