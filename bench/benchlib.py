"""What the benchmark scripts share: the CPU's name, writing raw results (JSON) and a results section
into a markdown file.

The scripts run as ``python bench/NAME.py``, so this directory is on ``sys.path`` and they import it
as ``benchlib``.
"""

from __future__ import annotations

import json
import platform
import re
from pathlib import Path

from snapgen.model_dir import write_file_atomically


def cpu_name() -> str:
    try:
        match = re.search(r"^model name\s*:\s*(.+)$", Path("/proc/cpuinfo").read_text(), re.M)
        if match:
            return match.group(1).strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def write_section(path: Path, section: str, start: str, end: str) -> None:
    """Replace the text between the ``start`` and ``end`` markers of ``path`` with ``section`` (which
    holds both markers), or append it; the file is replaced atomically."""
    text = path.read_text() if path.exists() else ""
    if start in text and end in text:
        before, rest = text.split(start, 1)
        after = rest.split(end, 1)[1].lstrip("\n")
        text = before + section + ("\n" + after if after else "")
    else:
        text = (text.rstrip("\n") + "\n\n" if text else "") + section
    write_file_atomically(path, lambda f: f.write(text.encode()))


def write_json(path: Path, data) -> None:
    """The raw results as indented JSON, replaced atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    write_file_atomically(path, lambda f: f.write((json.dumps(data, indent=2) + "\n").encode()))


def publish(section: str, out: Path | None, start: str, end: str) -> None:
    """Print the markdown section, and put it into ``out`` between its markers when given."""
    print(section)
    if out:
        write_section(out, section, start, end)
