"""Core ML bundles for the phone app: listing and resumable, verifiable downloads.

A bundle is a ``.zip`` file directly inside ``SNAPGEN_MOBILE_DIR`` (``snapgen export coreml``
writes them; its temporary ``.NAME.zip.*.part`` files are not listed). If the zip holds a
``manifest.json`` at its root, its ``created`` and ``version`` (or ``model.version``) are
reported; otherwise the version is read from a ``NAME-VERSION.zip`` file name, if it has one.

Downloads never join a client's string onto a path: the name must be a plain file name and is
looked up among the files listed in the directory. Responses carry ``ETag`` (the SHA-256),
``Accept-Ranges``/``Range`` (one range), ``If-None-Match``/``If-Range``, and the digest twice:
``X-Content-SHA256`` (hex) and ``Repr-Digest`` (RFC 9530).
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
import zipfile
from dataclasses import dataclass
from datetime import datetime, timezone
from email.utils import formatdate
from pathlib import Path

from starlette.responses import Response, StreamingResponse

from .security import safe_name

CHUNK = 256 * 1024
_VERSION_IN_NAME = re.compile(r"-(v?\d[\w.+-]*)$")


@dataclass(frozen=True)
class Bundle:
    name: str
    path: Path
    size: int
    mtime: float
    sha256: str
    version: str | None
    created: str

    def entry(self, base_url: str) -> dict:
        return {
            "name": self.name,
            "version": self.version,
            "size": self.size,
            "sha256": self.sha256,
            "created": self.created,
            "content_type": "application/zip",
            "url": f"{base_url}/v1/models/mobile/{self.name}",
        }


class BundleStore:
    def __init__(self, directory: str | Path | None):
        self.directory = Path(directory).resolve() if directory else None
        self._cache: dict[tuple[str, int, int], Bundle] = {}
        self._lock = threading.Lock()

    def list(self) -> list[Bundle]:
        """Every bundle in the directory (SHA-256 computed once per file version)."""
        if self.directory is None or not self.directory.is_dir():
            return []
        bundles = []
        for path in sorted(self.directory.iterdir()):
            if not (path.suffix == ".zip" and safe_name(path.name) and path.is_file()):
                continue
            real = path.resolve()
            if real.parent != self.directory:  # a symlink pointing elsewhere is not served
                continue
            stat = real.stat()
            key = (path.name, stat.st_size, stat.st_mtime_ns)
            with self._lock:
                bundle = self._cache.get(key)
            if bundle is None:
                bundle = self._describe(path.name, real, stat)
                with self._lock:
                    self._cache = {k: v for k, v in self._cache.items() if k[0] != path.name}
                    self._cache[key] = bundle
            bundles.append(bundle)
        return bundles

    def find(self, name: str) -> Bundle | None:
        if not safe_name(name):
            return None
        return next((b for b in self.list() if b.name == name), None)

    @staticmethod
    def _describe(name: str, path: Path, stat) -> Bundle:
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                digest.update(chunk)
        manifest = {}
        try:
            with zipfile.ZipFile(path) as z, z.open("manifest.json") as m:
                loaded = json.loads(m.read(1 << 20))
                manifest = loaded if isinstance(loaded, dict) else {}
        except (KeyError, zipfile.BadZipFile, ValueError, OSError):
            pass
        version = manifest.get("version")
        if version is None and isinstance(manifest.get("model"), dict):  # mobile_export's manifest layout
            version = manifest["model"].get("version")
        if version is None:
            match = _VERSION_IN_NAME.search(Path(name).stem)
            version = match.group(1) if match else None
        created = manifest.get("created")
        if not isinstance(created, str):
            created = datetime.fromtimestamp(stat.st_mtime, tz=timezone.utc).isoformat().replace("+00:00", "Z")
        return Bundle(
            name=name,
            path=path,
            size=stat.st_size,
            mtime=stat.st_mtime,
            sha256=digest.hexdigest(),
            version=None if version is None else str(version),
            created=created,
        )


_RANGE = re.compile(r"\s*bytes\s*=\s*(\d*)\s*-\s*(\d*)\s*", re.IGNORECASE)


def _position(digits: str, size: int) -> int:
    """A byte position, capped at ``size``: every position at or past the end means the same.

    A client may send any number of digits, and int() refuses more than 4300 of them, so a
    number longer than ``size`` is not converted at all.
    """
    digits = digits.lstrip("0") or "0"
    if len(digits) > len(str(size)):
        return size
    return min(int(digits), size)


def _parse_range(header: str, size: int) -> tuple[int, int] | str | None:
    """One ``bytes=`` range -> (start, end inclusive); "unsatisfiable"; None to send everything (RFC 9110 §14)."""
    match = _RANGE.fullmatch(header)
    if not match or (not match.group(1) and not match.group(2)):
        return None  # absent, malformed or several ranges: RFC 9110 lets us answer with the whole file
    first, last = match.group(1), match.group(2)
    if first:
        start = _position(first, size)
        if start >= size:
            return "unsatisfiable"
        end = min(_position(last, size), size - 1) if last else size - 1
        if end < start:
            return None
        return start, end
    suffix = _position(last, size)
    if suffix == 0 or size == 0:
        return "unsatisfiable"
    return size - suffix, size - 1


def _none_match(header: str, etag: str) -> bool:
    """If-None-Match compares weakly (RFC 9110 §13.1.2): W/"x" matches our "x"."""
    tags = [t.strip() for t in header.split(",")]
    return "*" in tags or any(t.removeprefix("W/") == etag for t in tags)


def _read(path: Path, start: int, length: int):
    with open(path, "rb") as f:
        f.seek(start)
        remaining = length
        while remaining > 0:
            chunk = f.read(min(CHUNK, remaining))
            if not chunk:
                break
            remaining -= len(chunk)
            yield chunk


def download(bundle: Bundle, method: str, headers) -> Response:
    etag = f'"{bundle.sha256}"'
    common = {
        "ETag": etag,
        "Accept-Ranges": "bytes",
        "X-Content-SHA256": bundle.sha256,
        "Repr-Digest": f"sha-256=:{base64.b64encode(bytes.fromhex(bundle.sha256)).decode()}:",
        "Last-Modified": formatdate(bundle.mtime, usegmt=True),
        "Cache-Control": "no-cache",
        "Content-Disposition": f'attachment; filename="{bundle.name}"',
    }
    if_none_match = headers.get("if-none-match")
    if if_none_match and _none_match(if_none_match, etag):
        return Response(status_code=304, headers=common)
    span = None
    range_header = headers.get("range")
    if range_header:
        if_range = headers.get("if-range")
        if if_range is None or if_range.strip() == etag:  # strong comparison: a weak tag never matches
            span = _parse_range(range_header, bundle.size)
    if span == "unsatisfiable":
        return Response(status_code=416, headers={**common, "Content-Range": f"bytes */{bundle.size}"})
    status, start, length = 200, 0, bundle.size
    if span is not None:
        start, end = span
        status, length = 206, end - start + 1
        common["Content-Range"] = f"bytes {start}-{end}/{bundle.size}"
    common["Content-Length"] = str(length)
    if method == "HEAD":
        return Response(status_code=status, headers=common, media_type="application/zip")
    return StreamingResponse(_read(bundle.path, start, length), status_code=status, headers=common,
                             media_type="application/zip")  # fmt: skip
