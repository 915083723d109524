"""URIs: local paths, ``s3://bucket/key`` and (read-only) ``http(s)://``.

Every write is atomic. Local files are written under a temporary name in the same
directory and renamed; S3 objects are uploaded from a local temp file, and an S3
object (single PUT or completed multipart upload) only becomes visible once complete.
A killed task therefore never leaves a half-written output under its final name.
"""

from __future__ import annotations

import contextlib
import functools
import os
import shutil
import tempfile
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING, Iterator

if TYPE_CHECKING:
    import numpy as np
    import pyarrow as pa
from urllib.parse import urlparse

from laion_tasks.config import StorageConfig


class StorageError(RuntimeError):
    """A storage operation failed; the message names the URI."""


@dataclass(frozen=True)
class S3Location:
    bucket: str
    key: str


def is_s3(uri: str) -> bool:
    return uri.startswith("s3://")


def is_http(uri: str) -> bool:
    return uri.startswith(("http://", "https://"))


def parse_s3(uri: str) -> S3Location:
    parsed = urlparse(uri)
    if parsed.scheme != "s3" or not parsed.netloc:
        raise StorageError(f"not an s3:// URI: {uri!r}")
    return S3Location(parsed.netloc, parsed.path.lstrip("/"))


def local_path(uri: str) -> Path:
    return Path(uri[len("file://") :] if uri.startswith("file://") else uri)


def join(base: str, *parts: str) -> str:
    """Join URI parts with '/' for s3/http and os.path for local paths."""
    if is_s3(base) or is_http(base):
        out = base.rstrip("/")
        for part in parts:
            out = f"{out}/{part.strip('/')}"
        return out
    return str(Path(base, *parts))


_config = StorageConfig()


def configure(config: StorageConfig) -> None:
    """Set the S3 endpoint and retry policy used by this process."""
    global _config
    _config = config
    _s3_client.cache_clear()


@functools.lru_cache(maxsize=4)
def _s3_client_for(endpoint: str | None, region: str, attempts: int):  # type: ignore[no-untyped-def]
    import boto3
    from botocore.config import Config

    return boto3.client(
        "s3",
        endpoint_url=endpoint or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL"),
        region_name=region,
        config=Config(retries={"max_attempts": attempts, "mode": "standard"}),
    )


@functools.lru_cache(maxsize=1)
def _s3_client():  # type: ignore[no-untyped-def]
    return _s3_client_for(_config.s3_endpoint_url, _config.s3_region, _config.s3_max_attempts)


def s3_client():  # type: ignore[no-untyped-def]
    return _s3_client()


def _wrap(uri: str, action: str, exc: Exception) -> StorageError:
    return StorageError(f"{action} {uri}: {type(exc).__name__}: {exc}")


def exists(uri: str) -> bool:
    if is_s3(uri):
        from botocore.exceptions import ClientError

        loc = parse_s3(uri)
        try:
            s3_client().head_object(Bucket=loc.bucket, Key=loc.key)
            return True
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
                return False
            raise _wrap(uri, "checking", exc) from exc
    if is_http(uri):
        raise StorageError(f"exists() is not supported for http URIs: {uri}")
    return local_path(uri).exists()


def output_exists(uri: str) -> bool:
    """A stage output is there: an object/file, or a directory/prefix holding at least one file.

    An empty local directory, or an S3 prefix with no objects under it, is not an output:
    a stage whose files are gone must run again.
    """
    if exists(uri) and not (not is_s3(uri) and local_path(uri).is_dir()):
        return True
    return bool(list_uris(uri))


def size(uri: str) -> int:
    if is_s3(uri):
        loc = parse_s3(uri)
        try:
            return int(s3_client().head_object(Bucket=loc.bucket, Key=loc.key)["ContentLength"])
        except Exception as exc:  # botocore raises many types
            raise _wrap(uri, "sizing", exc) from exc
    return local_path(uri).stat().st_size


@contextlib.contextmanager
def open_read(uri: str) -> Iterator[IO[bytes]]:
    """Open a URI for streaming binary reads."""
    if is_s3(uri):
        loc = parse_s3(uri)
        try:
            body = s3_client().get_object(Bucket=loc.bucket, Key=loc.key)["Body"]
        except Exception as exc:
            raise _wrap(uri, "opening", exc) from exc
        try:
            yield body  # botocore StreamingBody has read()
        finally:
            body.close()
        return
    if is_http(uri):
        import httpx

        try:
            with httpx.stream("GET", uri, timeout=_config.http_timeout_s, follow_redirects=True) as resp:
                resp.raise_for_status()
                yield _HttpxReader(resp)
        except httpx.HTTPError as exc:
            raise _wrap(uri, "fetching", exc) from exc
        return
    try:
        handle = open(local_path(uri), "rb")
    except OSError as exc:
        raise _wrap(uri, "opening", exc) from exc
    with handle:
        yield handle


class _HttpxReader:
    """A minimal file-like ``read(n)`` over an httpx streaming response."""

    def __init__(self, response) -> None:  # type: ignore[no-untyped-def]
        self._iter = response.iter_raw()
        self._buf = b""

    def read(self, n: int = -1) -> bytes:
        while n < 0 or len(self._buf) < n:
            chunk = next(self._iter, None)
            if chunk is None:
                break
            self._buf += chunk
        if n < 0:
            out, self._buf = self._buf, b""
        else:
            out, self._buf = self._buf[:n], self._buf[n:]
        return out

    def readable(self) -> bool:
        return True


def read_bytes(uri: str) -> bytes:
    with open_read(uri) as handle:
        return handle.read()


def read_text(uri: str) -> str:
    return read_bytes(uri).decode("utf-8")


@contextlib.contextmanager
def atomic_local_path(uri: str, suffix: str = "") -> Iterator[Path]:
    """Yield a local temp path; on clean exit it is committed to ``uri`` atomically.

    On any exception the temp file is removed and nothing appears under ``uri``.
    """
    if is_http(uri):
        raise StorageError(f"cannot write to an http URI: {uri}")
    if is_s3(uri):
        fd, tmp_name = tempfile.mkstemp(prefix="laion-", suffix=suffix or Path(uri).suffix)
        os.close(fd)
        tmp = Path(tmp_name)
        try:
            yield tmp
            loc = parse_s3(uri)
            try:
                # upload_file switches to multipart above 8 MB; the object appears only on completion.
                s3_client().upload_file(str(tmp), loc.bucket, loc.key)
            except Exception as exc:
                raise _wrap(uri, "uploading", exc) from exc
        finally:
            tmp.unlink(missing_ok=True)
        return
    final = local_path(uri)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(f".{final.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        yield tmp
        os.replace(tmp, final)
    finally:
        tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def open_write(uri: str) -> Iterator[IO[bytes]]:
    """Open a binary writer whose content appears at ``uri`` only if the block succeeds."""
    with atomic_local_path(uri) as tmp:
        with open(tmp, "wb") as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())


def file_sha256(path: str | os.PathLike[str]) -> str:
    """sha256 of a local file, streamed (the checksum lineage records for an output)."""
    import hashlib

    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def write_bytes(uri: str, data: bytes) -> None:
    with open_write(uri) as handle:
        handle.write(data)


def write_text(uri: str, text: str) -> None:
    write_bytes(uri, text.encode("utf-8"))


@contextlib.contextmanager
def local_copy(uri: str) -> Iterator[Path]:
    """A local path holding the object's bytes (the file itself when local)."""
    if not (is_s3(uri) or is_http(uri)):
        yield local_path(uri)
        return
    fd, tmp_name = tempfile.mkstemp(prefix="laion-", suffix=Path(urlparse(uri).path).suffix)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        with open_read(uri) as src, open(tmp, "wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 20)
        yield tmp
    finally:
        tmp.unlink(missing_ok=True)


def list_uris(prefix: str, suffix: str = "") -> list[str]:
    """Sorted URIs of the objects under a directory/prefix, optionally ending in ``suffix``."""
    if is_s3(prefix):
        loc = parse_s3(prefix)
        key_prefix = loc.key.rstrip("/") + "/" if loc.key else ""
        out: list[str] = []
        try:
            paginator = s3_client().get_paginator("list_objects_v2")
            for page in paginator.paginate(Bucket=loc.bucket, Prefix=key_prefix):
                for obj in page.get("Contents", []):
                    if obj["Key"].endswith(suffix):
                        out.append(f"s3://{loc.bucket}/{obj['Key']}")
        except Exception as exc:
            raise _wrap(prefix, "listing", exc) from exc
        return sorted(out)
    base = local_path(prefix)
    if not base.exists():
        return []
    return sorted(
        str(p) for p in base.rglob(f"*{suffix}") if p.is_file() and not p.name.startswith(".")
    )


def delete(uri: str) -> None:
    if is_s3(uri):
        loc = parse_s3(uri)
        s3_client().delete_object(Bucket=loc.bucket, Key=loc.key)
        return
    local_path(uri).unlink(missing_ok=True)


def ensure_bucket(uri: str) -> None:
    """Create the bucket of an s3:// root if missing (deployment and tests)."""
    if not is_s3(uri):
        local_path(uri).mkdir(parents=True, exist_ok=True)
        return
    from botocore.exceptions import ClientError

    bucket = parse_s3(uri).bucket
    try:
        s3_client().head_bucket(Bucket=bucket)
    except ClientError:
        s3_client().create_bucket(Bucket=bucket)


def write_parquet(uri: str, table: "pa.Table", compression: str = "zstd") -> int:
    """Write a table to ``uri`` atomically (the one Parquet writer of the stages); returns the bytes written."""
    import pyarrow.parquet as pq

    with atomic_local_path(uri, suffix=".parquet") as tmp:
        pq.write_table(table, tmp, compression=compression)
        return tmp.stat().st_size


def write_npy(uri: str, array: "np.ndarray") -> int:
    """Write an array to ``uri`` as .npy, atomically; returns the bytes written."""
    import numpy as np

    with atomic_local_path(uri, suffix=".npy") as tmp:
        with open(tmp, "wb") as handle:  # a file object: np.save would append ".npy" to the temp name
            np.save(handle, array, allow_pickle=False)
        return tmp.stat().st_size

