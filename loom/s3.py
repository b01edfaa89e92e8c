"""S3 (any S3-compatible endpoint: AWS, MinIO, moto): the process's cached boto3 clients,
``S3Store`` (the ``loom.storage.Store`` protocol over a bucket and prefix), and reading the
``s3://`` image paths of a dataset. ``loom.storage.store_from_url`` builds an S3Store for an
``s3://`` storage URL; the key rules both stores share are in loom/storage_keys.py."""

from __future__ import annotations

import os
import threading
from collections.abc import Iterable, Iterator
from datetime import datetime
from typing import Any, BinaryIO
from urllib.parse import urlparse

from loom.errors import InputMissing, StorageError
from loom.storage_keys import STREAM_CHUNK, dir_prefix, validate_key

# S3's minimum size of every multipart part but the last.
MIN_PART_SIZE = 5 * 1024 * 1024

# One client per process and configuration: boto3 clients are thread-safe (sessions are not)
# and each owns a connection pool, so creating one per request would waste sockets and time.
_clients: dict[tuple[int, str | None, str | None, int], Any] = {}
_clients_lock = threading.Lock()


def s3_client(
    endpoint_url: str | None = None, *, region: str | None = None, max_pool_connections: int = 32
) -> Any:
    """The cached boto3 S3 client for this process (re-created after fork: new pid)."""
    key = (os.getpid(), endpoint_url, region, max_pool_connections)
    client = _clients.get(key)
    if client is not None:
        return client
    with _clients_lock:
        client = _clients.get(key)
        if client is None:
            import boto3
            from botocore.config import Config

            config = Config(
                retries={"mode": "standard", "max_attempts": 5},
                max_pool_connections=max_pool_connections,
                signature_version="s3v4",
            )
            # A private session: boto3's default session is shared and not thread-safe.
            session = boto3.session.Session()
            client = session.client(
                "s3", endpoint_url=endpoint_url, region_name=region, config=config
            )
            _clients[key] = client
    return client


def close_clients() -> None:
    """Close cached clients (tests, shutdown): releases their pooled sockets."""
    with _clients_lock:
        for client in _clients.values():
            client.close()
        _clients.clear()


def parse_s3_url(url: str) -> tuple[str, str]:
    """``s3://bucket/some/prefix`` -> ("bucket", "some/prefix")."""
    parsed = urlparse(url)
    if parsed.scheme != "s3" or not parsed.netloc:
        raise ValueError(f"not an s3:// URL: {url!r}")
    return parsed.netloc, parsed.path.strip("/")


def read_uri(uri: str, *, endpoint_url: str | None = None) -> bytes:
    """The bytes of ``s3://bucket/key`` (a dataset's image path), through the process's cached
    client: ``endpoint_url`` for MinIO or moto, else boto3's own resolution (AWS_ENDPOINT_URL,
    the AWS config). InputMissing when there is no such object; StorageError otherwise."""
    from botocore.exceptions import BotoCoreError, ClientError

    try:
        bucket, key = parse_s3_url(uri)
    except ValueError as exc:
        raise InputMissing(str(exc)) from None
    try:
        body = s3_client(endpoint_url).get_object(Bucket=bucket, Key=key)["Body"]
        try:
            return bytes(body.read())
        finally:
            body.close()
    except ClientError as exc:
        if _is_missing(exc) or "NoSuchBucket" in str(exc):
            raise InputMissing(f"no object at {uri}") from exc
        raise StorageError(f"could not read {uri}: {exc}") from exc
    except BotoCoreError as exc:
        raise StorageError(f"could not read {uri}: {exc}") from exc


def _is_missing(exc: Exception) -> bool:
    response = getattr(exc, "response", None) or {}
    code = str(response.get("Error", {}).get("Code", ""))
    status = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
    return code in {"NoSuchKey", "404", "NotFound"} or status == 404


class S3Store:
    def __init__(
        self,
        bucket: str,
        prefix: str = "",
        *,
        endpoint_url: str | None = None,
        region: str | None = None,
        max_pool_connections: int = 32,
        part_size: int = 8 * 1024 * 1024,
    ) -> None:
        if part_size < MIN_PART_SIZE:
            raise ValueError(f"S3 multipart parts must be at least {MIN_PART_SIZE} bytes")
        self.part_size = part_size
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self.endpoint_url = endpoint_url
        self.region = region
        self.max_pool_connections = max_pool_connections

    @classmethod
    def from_url(cls, url: str, **kwargs: Any) -> S3Store:
        bucket, prefix = parse_s3_url(url)
        return cls(bucket, prefix, **kwargs)

    @property
    def client(self) -> Any:
        # Looked up per call (cheap dict hit), so a store built before a fork stays usable after.
        return s3_client(
            self.endpoint_url, region=self.region, max_pool_connections=self.max_pool_connections
        )

    def _key(self, key: str) -> str:
        validate_key(key)
        return f"{self.prefix}/{key}" if self.prefix else key

    def put(self, key: str, data: bytes, content_type: str = "application/octet-stream") -> None:
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            self.client.put_object(
                Bucket=self.bucket, Key=self._key(key), Body=data, ContentType=content_type
            )
        except (BotoCoreError, ClientError) as exc:
            raise StorageError(f"could not write {key}: {exc}") from exc

    def get(self, key: str) -> bytes:
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            body = self.client.get_object(Bucket=self.bucket, Key=self._key(key))["Body"]
            try:
                return bytes(body.read())  # StreamingBody.read checks the content length
            finally:
                body.close()
        except ClientError as exc:
            if _is_missing(exc):
                raise InputMissing(f"no object at {key}") from exc
            raise StorageError(f"could not read {key}: {exc}") from exc
        except BotoCoreError as exc:
            raise StorageError(f"could not read {key}: {exc}") from exc

    def exists(self, key: str) -> bool:
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            self.client.head_object(Bucket=self.bucket, Key=self._key(key))
            return True
        except ClientError as exc:
            if _is_missing(exc):
                return False
            raise StorageError(f"could not check {key}: {exc}") from exc
        except BotoCoreError as exc:
            raise StorageError(f"could not check {key}: {exc}") from exc

    def url(self, key: str, expires_seconds: int = 3600) -> str | None:
        """A presigned GET URL (signing is local: no request is made)."""
        return str(
            self.client.generate_presigned_url(
                "get_object",
                Params={"Bucket": self.bucket, "Key": self._key(key)},
                ExpiresIn=int(expires_seconds),
            )
        )

    def open_stream(self, key: str) -> Iterator[bytes]:
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            response = self.client.get_object(Bucket=self.bucket, Key=self._key(key))
        except ClientError as exc:
            if _is_missing(exc):
                raise InputMissing(f"no object at {key}") from exc
            raise StorageError(f"could not read {key}: {exc}") from exc
        except BotoCoreError as exc:
            raise StorageError(f"could not read {key}: {exc}") from exc
        body = response["Body"]
        try:
            yield from body.iter_chunks(STREAM_CHUNK)
        finally:
            body.close()

    def put_stream(
        self, key: str, f: BinaryIO, content_type: str = "application/octet-stream"
    ) -> None:
        """Upload a file object; boto3 switches to a multipart upload for big ones (8 MiB
        parts), so memory stays bounded whatever the size."""
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            self.client.upload_fileobj(
                f, self.bucket, self._key(key), ExtraArgs={"ContentType": content_type}
            )
        except (BotoCoreError, ClientError) as exc:
            raise StorageError(f"could not write {key}: {exc}") from exc

    def put_chunks(
        self, key: str, chunks: Iterable[bytes], content_type: str = "application/octet-stream"
    ) -> int:
        """A multipart upload, one part per ``part_size`` bytes, sent from this thread: memory
        stays at about one part however large the object (upload_fileobj would keep up to ten
        8 MiB parts in flight). An object smaller than one part is a single PUT. The object
        appears only when the upload completes; a failure aborts it (no orphaned parts)."""
        from botocore.exceptions import BotoCoreError, ClientError

        s3_key = self._key(key)
        client = self.client
        buf = bytearray()
        size = 0
        upload_id: str | None = None
        parts: list[dict[str, Any]] = []

        def send_part() -> None:
            nonlocal upload_id
            if upload_id is None:
                upload_id = client.create_multipart_upload(
                    Bucket=self.bucket, Key=s3_key, ContentType=content_type
                )["UploadId"]
            number = len(parts) + 1
            # The bytearray itself, not a bytes() copy: upload_part is synchronous.
            etag = client.upload_part(Bucket=self.bucket, Key=s3_key, UploadId=upload_id,
                                      PartNumber=number, Body=buf)["ETag"]
            parts.append({"ETag": etag, "PartNumber": number})
            buf.clear()

        try:
            for chunk in chunks:
                buf += chunk
                size += len(chunk)
                if len(buf) >= self.part_size:
                    send_part()
            if upload_id is None:  # it all fitted in one part
                client.put_object(Bucket=self.bucket, Key=s3_key, Body=bytes(buf),
                                  ContentType=content_type)
                return size
            if buf:
                send_part()
            client.complete_multipart_upload(Bucket=self.bucket, Key=s3_key, UploadId=upload_id,
                                             MultipartUpload={"Parts": parts})
            return size
        except BaseException as exc:
            if upload_id is not None:
                try:
                    client.abort_multipart_upload(Bucket=self.bucket, Key=s3_key,
                                                  UploadId=upload_id)
                except (BotoCoreError, ClientError):
                    pass  # a bucket lifecycle rule is the backstop for orphaned parts
            if isinstance(exc, (BotoCoreError, ClientError)):
                raise StorageError(f"could not write {key}: {exc}") from exc
            raise

    def delete(self, key: str) -> None:
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            self.client.delete_object(Bucket=self.bucket, Key=self._key(key))
        except (BotoCoreError, ClientError) as exc:
            raise StorageError(f"could not delete {key}: {exc}") from exc

    def _strip(self, full: str) -> str:
        return full[len(self.prefix) + 1:] if self.prefix else full

    def list_dirs(self, prefix: str) -> list[str]:
        """Names of the 'directories' directly under ``prefix`` ('' or 'a/b/')."""
        from botocore.exceptions import BotoCoreError, ClientError

        rel = dir_prefix(prefix)
        full = f"{self.prefix}/{rel}" if self.prefix else rel
        out: list[str] = []
        try:
            pages = self.client.get_paginator("list_objects_v2").paginate(
                Bucket=self.bucket, Prefix=full, Delimiter="/")
            for page in pages:
                for cp in page.get("CommonPrefixes", []):
                    out.append(cp["Prefix"][len(full):].rstrip("/"))
        except (BotoCoreError, ClientError) as exc:
            raise StorageError(f"could not list {prefix}: {exc}") from exc
        return sorted(out)

    def list_objects(self, prefix: str) -> Iterator[tuple[str, datetime]]:
        """(key, last modified, UTC) of every object under ``prefix``."""
        from botocore.exceptions import BotoCoreError, ClientError

        rel = dir_prefix(prefix)
        full = f"{self.prefix}/{rel}" if self.prefix else rel
        try:
            for page in self.client.get_paginator("list_objects_v2").paginate(
                    Bucket=self.bucket, Prefix=full):
                for obj in page.get("Contents", []):
                    yield self._strip(obj["Key"]), obj["LastModified"]
        except (BotoCoreError, ClientError) as exc:
            raise StorageError(f"could not list {prefix}: {exc}") from exc


