"""Every command that README.md, docs/server.md and deploy/README.md show to run, run as written.

The ```bash blocks are read command by command (a trailing backslash continues one), the ```python
blocks as one program each. What the docs mark:

- ``# needs: R1, R2`` as a block's first line marks the block, as a command's trailing comment that
  command: it needs what this machine lacks (R in ``REASONS``: Docker, an NVIDIA GPU, a Kubernetes
  cluster, a Triton server, a long exclusive run). Those are not run; ``test_marked_command`` lists
  each one as skipped, with its reason, and ``test_few_commands_are_marked`` keeps that list short.
- What CI runs itself is not run again here: ``bash scripts/setup.sh``, ``bash scripts/test.sh`` and
  ``python -m pytest`` (``test_ci_runs_the_documented_test_commands`` checks that CI runs them).

Each document runs in order in its own temporary directory (later commands use what earlier ones
made: ``out.png``, the model directory ``DIR``), with the venv's bin first on PATH and ``.venv`` and
``configs`` linked from the checkout, as a reader at the checkout's root has them. The files a reader
brings are made first: ``prompts.txt``, ``in.png``, ``keys.txt``, and a Core ML bundle in
``SNAPGEN_MOBILE_DIR``. What differs from a reader's terminal, and only that:

- Servers (``snapgen serve``, ``snapgen worker``, ``redis-server``, anything ending in ``&``) start in
  the background and are waited for (``/healthz`` and, embedded, ``/readyz``; a worker's ``/metrics``;
  Redis's PING). The first ``snapgen serve`` of a document stays up to its end and answers the later
  blocks' curl and Python examples; any other server stops at the end of its block.
- Ports are free ones: ``8000`` is the port of that first server (or, in a block that starts its own
  server, of that one; ``SNAPGEN_PORT`` says it to a ``snapgen serve`` without ``--port``), every other
  port a command names gets a free one per block, and ``redis-server`` is given ``--port``.
- ``ID`` is the id of the last job an earlier command printed.

A command passes when it exits with 0, prints no error envelope (``"error": {``) and no non-2xx HTTP
status line, and the file a ``curl -o`` writes is not an error either.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests" / "server"))

from server_harness import clean_env, free_port, wait_until  # noqa: E402

DOCS = ["README.md", "docs/server.md", "deploy/README.md"]
VENV_BIN = Path(sys.executable).parent
REASONS = {
    "docker": "Docker Engine with Compose v2 (none on these machines)",
    "gpu": "an NVIDIA GPU",
    "kubernetes": "a Kubernetes cluster",
    "triton": "a running Triton server (docs/triton.md)",
    # More than the 30 s a command may take here. The export and the evaluation have tests of their own
    # with small inputs (tests/mobile_export, tests/test_shapesbench.py); the benchmark is run by hand.
    "minutes": "minutes of CPU (the ShapesBench evaluation, a Core ML conversion, the server benchmark)",
}
# Local ports the docs name, other than the API's 8000: Redis, a webhook receiver, worker metrics, Triton.
OTHER_PORTS = ("6379", "9000", "9101", "9102", "9103", "8001")
STARTUP_TIMEOUT = 300.0  # a model loading on two busy cores
COMMAND_TIMEOUT = 300.0

_FENCE = re.compile(r"^(?P<indent>[ \t]*)```(?P<lang>\w*)[^\n]*\n(?P<body>.*?)^(?P=indent)```[ \t]*$", re.S | re.M)
_BLOCK_NEEDS = re.compile(r"^#\s*needs:\s*(?P<reasons>[\w ,]+?)\s*$")
_LINE_NEEDS = re.compile(r"#[^'\"\n]*\bneeds:\s*(?P<reasons>\w+(?:,\s*\w+)*)\s*$")
_CI = re.compile(r"^(nice -n \d+ )?(bash scripts/(setup|test)\.sh|\S*python3? -m pytest)\b")
_ENV_PREFIX = re.compile(r"^(?:[A-Z_][A-Z0-9_]*=\S*\s+)*")


@dataclass
class Command:
    doc: str
    line: int
    lang: str  # bash or python
    text: str
    needs: list[str] = field(default_factory=list)

    @property
    def program(self) -> str:
        """The command without leading VAR=value assignments and without .venv/bin/."""
        return _ENV_PREFIX.sub("", self.text).removeprefix(".venv/bin/")

    @property
    def ci(self) -> bool:
        return self.lang == "bash" and bool(_CI.match(self.program))

    @property
    def background(self) -> bool:
        if self.lang != "bash":
            return False
        return self.text.rstrip().endswith("&") or self.program.startswith(
            ("snapgen serve", "snapgen worker", "redis-server")
        )

    def __str__(self) -> str:
        return f"{self.doc}:{self.line}: {self.text.splitlines()[0]}"


def _reasons(text: str) -> list[str]:
    return [r.strip() for r in text.split(",") if r.strip()]


def read_blocks(doc: str, text: str | None = None) -> list[list[Command]]:
    """The runnable blocks of a document, each a list of commands (a python block is one command)."""
    text = (ROOT / doc).read_text() if text is None else text
    blocks = []
    for m in _FENCE.finditer(text):
        lang = {"bash": "bash", "sh": "bash", "python": "python"}.get(m.group("lang"))
        if lang is None:
            continue
        first_line = text.count("\n", 0, m.start()) + 2
        lines = [line.removeprefix(m.group("indent")) for line in m.group("body").splitlines()]
        block_needs: list[str] = []
        first = next((line.strip() for line in lines if line.strip()), "")
        if _BLOCK_NEEDS.match(first):
            block_needs = _reasons(_BLOCK_NEEDS.match(first).group("reasons"))
        if lang == "python":
            blocks.append([Command(doc, first_line, lang, "\n".join(lines), block_needs)])
            continue
        commands, pending, start = [], [], 0
        for i, line in enumerate(lines):
            if not pending and (not line.strip() or line.lstrip().startswith("#")):
                continue
            if not pending:
                start = first_line + i
            pending.append(line)
            if line.rstrip().endswith("\\"):
                continue
            command = "\n".join(pending).strip()
            pending = []
            trailing = _LINE_NEEDS.search(command)
            needs = _reasons(trailing.group("reasons")) if trailing else block_needs
            if command.startswith("bash scripts/setup.sh && "):  # the set-up is CI's; the rest runs here
                commands.append(Command(doc, start, lang, "bash scripts/setup.sh"))
                command = command.removeprefix("bash scripts/setup.sh && ")
            commands.append(Command(doc, start, lang, command, needs))
        blocks.append(commands)
    return blocks


ALL = {doc: read_blocks(doc) for doc in DOCS}
MARKED = [c for doc in DOCS for block in ALL[doc] for c in block if c.needs]


# ------------------------------------------------------------------------------------- not run here
@pytest.mark.parametrize("command", MARKED, ids=str)
def test_marked_command(command: Command):
    unknown = [r for r in command.needs if r not in REASONS]
    assert not unknown, f"{command}: unknown reason(s) {unknown}; known: {sorted(REASONS)}"
    pytest.skip(f"needs {', '.join(command.needs)}: {command}")


def test_few_commands_are_marked():
    runnable = [c for doc in DOCS for block in ALL[doc] for c in block if not c.needs and not c.ci]
    by_reason = {r: sum(r in c.needs for c in MARKED) for r in REASONS}
    assert {r for c in MARKED for r in c.needs} <= REASONS.keys()
    # Docker (the compose walk-through, image builds) is most of them; the rest are single lines.
    without_docker = [str(c) for c in MARKED if "docker" not in c.needs]
    assert len(without_docker) <= 8, without_docker
    assert len(MARKED) <= 25 and len(runnable) >= len(MARKED), (len(MARKED), len(runnable), by_reason)


def test_ci_runs_the_documented_test_commands():
    assert "exec bash scripts/test.sh" in (ROOT / ".ci" / "run").read_text()
    test_sh = (ROOT / "scripts" / "test.sh").read_text()
    assert "bash scripts/setup.sh" in test_sh and "-m pytest" in test_sh
    assert 'testpaths = ["tests"]' in (ROOT / "pyproject.toml").read_text()
    ci = [c for doc in DOCS for block in ALL[doc] for c in block if c.ci]
    for command in ci:
        for target in re.findall(r"\btests/\S+", command.text):
            assert (ROOT / target).exists(), f"{command}: {target} does not exist"
    assert len(ci) >= 3


# ---------------------------------------------------------------------------------------- run here
class Reader:
    """One document's commands, in order, in one directory."""

    def __init__(self, doc: str, work: Path):
        self.doc, self.work = doc, work
        self.env = clean_env(PATH=f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}")
        self.page_port = free_port()
        self.page_server: subprocess.Popen | None = None
        self.keep: list[subprocess.Popen] = []
        self.last_id: str | None = None
        self.ran: list[str] = []
        self._prepare()

    def _prepare(self) -> None:
        from PIL import Image, ImageDraw

        for name in (".venv", "configs"):
            (self.work / name).symlink_to(ROOT / name)
        (self.work / "prompts.txt").write_text("a red circle\ntwo blue squares\n")
        image = Image.new("RGB", (128, 128), "white")
        ImageDraw.Draw(image).ellipse((32, 32, 96, 96), fill="red")
        image.save(self.work / "in.png")
        (self.work / "keys.txt").write_text("# one key a line\nreader-key-1\n")
        bundles = self.work / "served-bundles"
        bundles.mkdir()
        with zipfile.ZipFile(bundles / "snapgen-ios.zip", "w") as z:
            z.writestr("manifest.json", json.dumps({"name": "snapgen-ios", "version": "0.1.0"}))
        self.env["SNAPGEN_MOBILE_DIR"] = str(bundles)

    # -- one block
    def run_block(self, block: list[Command]) -> None:
        starts_server = any(c.background and c.program.startswith("snapgen serve") for c in block if not c.needs)
        own_port = starts_server and self.page_server is not None
        ports = {"8000": str(free_port() if own_port else self.page_port)}
        ports.update({p: str(free_port()) for p in OTHER_PORTS})
        env = dict(self.env, SNAPGEN_PORT=ports["8000"])
        started: list[subprocess.Popen] = []
        try:
            for command in block:
                if command.needs or command.ci:
                    continue
                text = self._translate(command.text, ports)
                if command.background:
                    proc = self._start(command, text, env)
                    if command.program.startswith("snapgen serve") and not own_port and self.page_server is None:
                        self.page_server = proc
                    (started if own_port or proc is not self.page_server else self.keep).append(proc)
                elif command.lang == "python":
                    self._run(command, [str(VENV_BIN / "python"), "-c", text], env)
                elif command.program.startswith("export "):
                    out = self._run(command, ["bash", "-c", f"{text}\nenv -0"], env, check_output=False)
                    self.env.update(dict(kv.split("=", 1) for kv in out.split("\0") if "=" in kv))
                    env.update(self.env, SNAPGEN_PORT=ports["8000"])
                else:
                    self._run(command, ["bash", "-c", text], env)
                    self._claims(command)
            self._scaled_out_ready(block, ports)
        finally:
            for proc in started:
                _stop(proc)

    def _scaled_out_ready(self, block: list[Command], ports: dict[str, str]) -> None:
        """A block that starts an API on Redis and a worker: the API must see the worker ready."""
        programs = [c.program for c in block if c.background and not c.needs]
        if any(p.startswith("snapgen serve --redis") for p in programs) and any(
            p.startswith("snapgen worker") for p in programs
        ):
            url = f"http://127.0.0.1:{ports['8000']}/readyz"
            wait_until(lambda: httpx.get(url, timeout=5).status_code == 200, STARTUP_TIMEOUT,
                       f"{self.doc}: the API on Redis to see a ready worker ({url})", interval=0.5)  # fmt: skip
            self.ran.append(f"{self.doc}: {url} answered 200 (the worker is ready)")

    def close(self) -> None:
        for proc in self.keep:
            _stop(proc)

    # -- translation
    def _translate(self, text: str, ports: dict[str, str]) -> str:
        pattern = r"(?<![\w.])(8000|" + "|".join(OTHER_PORTS) + r")(?!\d)"
        text = re.sub(pattern, lambda m: ports[m.group(1)], text)
        text = re.sub(r"\bredis-server\b", f"redis-server --port {ports['6379']}", text, count=1)
        if re.search(r"\bID\b", text):
            assert self.last_id, f"{text}: no job id printed by an earlier command"
            text = re.sub(r"\bID\b", self.last_id, text)
        return text

    # -- foreground
    def _run(self, command: Command, args: list[str], env: dict, check_output: bool = True) -> str:
        started = time.monotonic()
        out = subprocess.run(args, cwd=self.work, env=env, capture_output=True, text=True, timeout=COMMAND_TIMEOUT)
        self.ran.append(f"{time.monotonic() - started:5.1f}s  {command}")
        shown = f"{command}\n--- exit {out.returncode}\n{out.stdout[-3000:]}\n--- stderr\n{out.stderr[-3000:]}"
        assert out.returncode == 0, shown
        if check_output:
            assert not re.search(r'"error":\s*\{', out.stdout), shown
            for status in re.findall(r"^HTTP/[\d.]+ (\d{3})", out.stdout, re.M):
                assert status.startswith("2"), shown
            written = re.search(r"\s-o\s+(\S+)", args[-1]) if args[0] == "bash" else None
            if written:
                head = (self.work / written.group(1)).read_bytes()[:64]
                assert not head.lstrip().startswith(b'{"error"'), f"{shown}\n--- {written.group(1)}: {head!r}"
            ids = re.findall(r'"id":\s*"([0-9a-f]{32})"', out.stdout)
            if ids:
                self.last_id = ids[0]
        return out.stdout

    def _claims(self, command: Command) -> None:
        """A few sentences the docs say about a command's result, checked."""
        if "--from out.png --out again.png" in command.text:  # "the same image again, byte for byte"
            assert (self.work / "again.png").read_bytes() == (self.work / "out.png").read_bytes()

    # -- background
    def _start(self, command: Command, text: str, env: dict) -> subprocess.Popen:
        text = text.rstrip().removesuffix("&").rstrip()
        with open(self.work / f"bg-{command.line}.log", "ab") as log:
            proc = subprocess.Popen(["bash", "-c", text], cwd=self.work, env=env, stdout=log,
                                    stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip
        started = time.monotonic()

        def alive():
            if proc.poll() is not None:
                tail = (self.work / f"bg-{command.line}.log").read_text(errors="replace")[-3000:]
                raise AssertionError(f"{command} exited with {proc.returncode}:\n{tail}")

        program = _ENV_PREFIX.sub("", text)
        if "redis-server" in program:
            import redis

            port = int(re.search(r"--port (\d+)", program).group(1))
            client = redis.Redis(port=port, socket_connect_timeout=1)
            wait_until(lambda: alive() or client.ping(), 30, f"{command}")
        else:
            if "snapgen worker" in program:
                metrics_port = re.search(r"--metrics-port (\d+)", program).group(1)
                urls = [f"http://127.0.0.1:{metrics_port}/metrics"]
            else:
                port = (re.search(r"--port (\d+)", program) or re.search(r"(\d+)", env["SNAPGEN_PORT"])).group(1)
                paths = ["/healthz"] if "--redis" in program else ["/healthz", "/readyz"]
                urls = [f"http://127.0.0.1:{port}{path}" for path in paths]
            for url in urls:
                wait_until(lambda url=url: alive() or httpx.get(url, timeout=5).status_code == 200,
                           STARTUP_TIMEOUT, f"{command}: {url}", interval=0.2)  # fmt: skip
        self.ran.append(f"{time.monotonic() - started:5.1f}s  {command}  (background)")
        return proc


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(30)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)
    except ProcessLookupError:
        pass


@pytest.mark.parametrize("doc", DOCS)
def test_document_commands_run(doc, tmp_path):
    reader = Reader(doc, tmp_path)
    try:
        for block in ALL[doc]:
            reader.run_block(block)
    finally:
        reader.close()
        print(f"\n{doc}: {len(reader.ran)} commands run\n" + "\n".join(reader.ran))
    assert reader.ran, f"{doc}: nothing ran"


def test_reading_the_markers():
    blocks = {b[0].text.splitlines()[0]: b for b in ALL["deploy/README.md"]}
    compose = next(b for first, b in blocks.items() if first.startswith("docker compose version"))
    assert all(c.needs == ["docker"] for c in compose)  # the block's first-line marker covers every command
    server = [c for block in ALL["docs/server.md"] for c in block]
    workers = [c for c in server if c.program.startswith("snapgen worker")]
    assert [c.needs for c in workers] == [[], ["gpu"], ["gpu"], ["triton"]]  # trailing markers, one command each
    assert all(c.background for c in workers)
    setup = [c for c in ALL["README.md"][0]]
    assert [c.ci for c in setup] == [True, False] and setup[1].program.startswith("snapgen generate")
    assert shlex.split(setup[1].text)[-1] == "x.png"


@pytest.mark.parametrize(
    "block, message",
    [
        ("snapgen info --no-such-flag x.png", "exit 2"),
        ("printf '{\"error\": {\"code\": \"not_found\"}}'", '"error": {'),
        ("printf 'HTTP/1.1 404 Not Found\\r\\n'", "HTTP/1.1 404"),
        ("curl -s -o page.json file:///dev/null; printf '{\"error\": {}}' > page.json", "page.json"),
    ],
)  # fmt: skip
def test_a_wrong_command_fails(tmp_path, block, message):
    (commands,) = read_blocks("wrong.md", f"```bash\n{block}\n```\n")
    reader = Reader("wrong.md", tmp_path)
    with pytest.raises(AssertionError) as failure:
        reader.run_block(commands)
    assert message in str(failure.value)
