"""Expected sizes of the images deploy/Dockerfile builds, from the installed sizes of their packages
(no container engine needed). Numbers for deploy/README.md, "Images". Python 3.11+ (tomllib).

  python scripts/image_sizes.py installed api
      the project with these extras, as installed in this interpreter's environment: every distribution
      in the closure of its requirements and the bytes of its files (RECORD); the project itself counted as
      the non-editable install copies it
  python scripts/image_sizes.py wheels --index-url https://pypi.org/simple torch==2.13.0
      what pip would install for these requirements on Linux x86-64 (pip install --dry-run --report, nothing
      installed), each wheel's download size and its unpacked size, read from the zip's central directory
      with HTTP range requests (the wheels are not downloaded)
"""

from __future__ import annotations

import argparse
import importlib.metadata as md
import json
import re
import struct
import subprocess
import sys
import tempfile
import urllib.request
from pathlib import Path

import tomllib

try:
    from packaging.requirements import Requirement
except ImportError:  # a bare venv: pip's own copy
    from pip._vendor.packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parent.parent
MB = 1e6
# The slim Debian bookworm images (glibc 2.36): every manylinux tag up to 2.36 installs.
PLATFORMS = [arg for n in range(36, 16, -1) for arg in ("--platform", f"manylinux_2_{n}_x86_64")] + [
    "--platform", "manylinux2014_x86_64", "--platform", "linux_x86_64",
]  # fmt: skip


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def project() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def project_bytes() -> int:
    """The package directories a non-editable install copies (pyproject's packages), without bytecode."""
    include = project_packages()
    return sum(
        p.stat().st_size
        for name in include
        for p in (ROOT / name).rglob("*")
        if p.is_file() and "__pycache__" not in p.parts and p.suffix != ".pyc"
    )


def project_packages() -> list[str]:
    patterns = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]
    return [p.rstrip("*") for p in patterns["include"]]


def closure(extras: list[str]) -> dict[str, md.Distribution]:
    """Every installed distribution the project with ``extras`` needs, by canonical name."""
    meta = project()
    name = canonical(meta["name"])
    wanted: list[tuple[str, set[str]]] = [(name, set(extras))]
    found: dict[str, md.Distribution] = {}
    done: set[tuple[str, str]] = set()
    while wanted:
        dist_name, dist_extras = wanted.pop()
        for extra in dist_extras | {""}:
            if (dist_name, extra) in done:
                continue
            done.add((dist_name, extra))
            if dist_name == name:
                lines = meta["dependencies"] if not extra else meta["optional-dependencies"][extra]
            else:
                dist = md.distribution(dist_name)
                found[dist_name] = dist
                lines = dist.requires or []
            for line in lines:
                req = Requirement(line)
                env = {"extra": extra} if dist_name != name else {"extra": ""}
                if req.marker is not None and not req.marker.evaluate(env):
                    continue
                wanted.append((canonical(req.name), set(req.extras)))
    found.pop(name, None)
    return found


def installed_bytes(dist: md.Distribution) -> int:
    total = 0
    for file in dist.files or []:
        path = Path(dist.locate_file(file))
        if path.is_file():
            total += path.stat().st_size
    return total


def cmd_installed(args) -> None:
    dists = closure(args.extras)
    rows = [(installed_bytes(d), canonical(d.metadata["Name"]), d.version) for d in dists.values()]
    rows.append((project_bytes(), project()["name"] + " (non-editable)", project()["version"]))
    rows.sort(reverse=True)
    for size, name, version in rows[: args.top]:
        print(f"{size / MB:9.1f} MB  {name} {version}")
    if len(rows) > args.top:
        print(f"{sum(r[0] for r in rows[args.top :]) / MB:9.1f} MB  {len(rows) - args.top} others")
    print(f"{sum(r[0] for r in rows) / MB:9.1f} MB  total: {len(rows)} distributions, extras {','.join(args.extras)}")


def _tail(url: str, length: int) -> tuple[bytes, int]:
    request = urllib.request.Request(url, headers={"Range": f"bytes=-{length}"})
    with urllib.request.urlopen(request, timeout=60) as response:
        data = response.read()
        total = int((response.headers.get("Content-Range") or "/0").rsplit("/", 1)[1])
    return data, total


def unpacked_bytes(url: str) -> tuple[int, int]:
    """(download size, sum of the uncompressed sizes of its members) of a wheel at ``url``, from its tail."""
    data, total = _tail(url, 65_536)
    end = data.rfind(b"PK\x05\x06")
    cd_size, cd_offset = struct.unpack("<II", data[end + 12 : end + 20])
    entries = struct.unpack("<H", data[end + 10 : end + 12])[0]
    if cd_size == 0xFFFFFFFF or entries == 0xFFFF or cd_offset == 0xFFFFFFFF:  # zip64
        locator = data.rfind(b"PK\x06\x07")
        record = struct.unpack("<Q", data[locator + 8 : locator + 16])[0]
        start = len(data) - (total - record)
        cd_size, cd_offset = struct.unpack("<QQ", data[start + 40 : start + 56])
    if cd_size + 200_000 > len(data):
        data, total = _tail(url, cd_size + 200_000)
    directory = data[len(data) - (total - cd_offset) :][:cd_size]
    unpacked, at = 0, 0
    while at + 46 <= len(directory) and directory[at : at + 4] == b"PK\x01\x02":
        size = struct.unpack("<I", directory[at + 24 : at + 28])[0]
        name_len, extra_len, comment_len = struct.unpack("<HHH", directory[at + 28 : at + 34])
        if size == 0xFFFFFFFF:  # the real size is in the zip64 extra field
            extra = directory[at + 46 + name_len : at + 46 + name_len + extra_len]
            size = struct.unpack("<Q", extra[4:12])[0]
        unpacked += size
        at += 46 + name_len + extra_len + comment_len
    return total, unpacked


def cmd_wheels(args) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "report.json"
        command = [sys.executable, "-m", "pip", "install", "--dry-run", "--quiet", "--ignore-installed",
                   "--only-binary", ":all:", *PLATFORMS, "--python-version",
                   args.python_version, "--target", tmp, "--report", str(report), "--isolated",
                   "--index-url", args.index_url, *args.requirements]  # fmt: skip
        subprocess.run(command, check=True)
        items = json.loads(report.read_text())["install"]
    rows = []
    for item in items:
        url = item["download_info"]["url"]
        download, unpacked = unpacked_bytes(url)
        rows.append((unpacked, download, item["metadata"]["name"], item["metadata"]["version"]))
    rows.sort(reverse=True)
    for unpacked, download, name, version in rows:
        print(f"{unpacked / MB:9.1f} MB unpacked  {download / MB:8.1f} MB download  {name} {version}")
    print(f"{sum(r[0] for r in rows) / MB:9.1f} MB unpacked  {sum(r[1] for r in rows) / MB:8.1f} MB download  "
          f"total: {len(rows)} wheels")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("installed", help="the project's closure with EXTRAS in this environment")
    p.add_argument("extras", nargs="*")
    p.add_argument("--top", type=int, default=15, help="distributions listed one by one")
    p.set_defaults(func=cmd_installed)
    w = sub.add_parser("wheels", help="what pip would install for REQUIREMENTS, sizes read remotely")
    w.add_argument("requirements", nargs="+")
    w.add_argument("--index-url", default="https://pypi.org/simple")
    w.add_argument("--python-version", default="3.11")
    w.set_defaults(func=cmd_wheels)
    args = parser.parse_args()
    args.func(args)


if __name__ == "__main__":
    main()
