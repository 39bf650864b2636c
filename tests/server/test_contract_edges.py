"""One generation contract, four front doors: the CLI, the pipeline, the HTTP API and the worker give the
same answer (the same field, the same message) at each edge of what a model allows.

The edges: the largest seed with more than one image (image i uses seed + i, which would pass the
uint32 range), steps at the model's max_steps (allowed) and one more (refused), and a size the model
does not make.
"""

from __future__ import annotations

import asyncio
import threading
import uuid

import pytest

from server.backends import TorchBackend
from server.queue import FAILED, SUCCEEDED, Job, MemoryJobQueue
from server.worker import Worker
from snapgen.cli import main
from snapgen.model_dir import load_pipeline
from snapgen.request import MAX_SEED, GenerationRequest, InvalidRequestError

MAX_STEPS = 50  # the tiny test model's max_steps (its scheduler config)

# (the request, the field its error names, or None when it is allowed)
EDGES = {
    "largest seed, two images": (dict(prompt=["a red circle", "a blue square"], seed=MAX_SEED), "seed"),
    "largest seed that fits two images": (dict(prompt=["a red circle", "a blue square"], seed=MAX_SEED - 1), None),
    "steps = max_steps": (dict(prompt="a red circle", seed=1, steps=MAX_STEPS), None),
    "steps = max_steps + 1": (dict(prompt="a red circle", seed=1, steps=MAX_STEPS + 1), "steps"),
    "a size the model does not make": (dict(prompt="a red circle", seed=1, width=256), "width"),
}


def pipeline_answer(pipe, kwargs) -> tuple[str, str] | None:
    try:
        pipe(kwargs["prompt"], seeds=kwargs["seed"], steps=kwargs.get("steps"), width=kwargs.get("width"),
             output_type="latent")  # fmt: skip
    except InvalidRequestError as e:
        return e.field, e.message
    return None


def cli_answer(model, kwargs, tmp_path, capsys) -> tuple[str, str] | None:
    prompts = [kwargs["prompt"]] if isinstance(kwargs["prompt"], str) else kwargs["prompt"]
    prompt_file = tmp_path / "prompts.txt"
    prompt_file.write_text("\n".join(prompts) + "\n")
    out_dir = tmp_path / f"out-{uuid.uuid4().hex[:6]}"
    args = ["generate", "--prompt-file", str(prompt_file), "--out-dir", str(out_dir), "--model", str(model),
            "--seed", str(kwargs["seed"])]  # fmt: skip
    for name in ("steps", "width"):
        if name in kwargs:
            args += [f"--{name}", str(kwargs[name])]
    capsys.readouterr()
    if main(args) == 0:
        assert len(list(out_dir.iterdir())) == len(prompts)
        return None
    assert not out_dir.exists() or not list(out_dir.iterdir())  # nothing half-written
    line = capsys.readouterr().err.strip().splitlines()[-1]
    flag, _, message = line.removeprefix("snapgen generate: error: ").partition(": ")
    return flag.removeprefix("--").replace("-", "_"), message


def http_answer(client, kwargs) -> tuple[str, str] | None:
    prompts = [kwargs["prompt"]] if isinstance(kwargs["prompt"], str) else kwargs["prompt"]
    body = {k: v for k, v in kwargs.items() if k != "prompt"}
    # The API takes one prompt and n images of it; the seed rule counts images, not prompts.
    response = client.post("/v1/generate", json={"prompt": prompts[0], "n": len(prompts), **body})
    if response.status_code == 200:
        assert [d["seed"] for d in response.json()["data"]] == [kwargs["seed"] + i for i in range(len(prompts))]
        return None
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    return error["field"], error["message"].removeprefix(f"{error['field']}: ")


def worker_answer(model, kwargs) -> tuple[str, str] | None:
    """A job that reached the queue without the API (so the worker alone resolves it)."""
    prompts = [kwargs["prompt"]] if isinstance(kwargs["prompt"], str) else kwargs["prompt"]
    try:
        request = GenerationRequest(prompts[0], n=len(prompts), **{k: v for k, v in kwargs.items() if k != "prompt"})
    except InvalidRequestError as e:  # the request type refuses it before any queue could carry it
        return e.field, e.message
    queue = MemoryJobQueue()
    job = Job(id=uuid.uuid4().hex, request=request)
    loop = asyncio.new_event_loop()
    loop.run_until_complete(queue.submit(job, 10))
    worker = Worker(queue, lambda: TorchBackend(model, trace_unet=False), warmup=False, heartbeat_s=0.2)
    thread = threading.Thread(target=worker.run, daemon=True)
    thread.start()
    try:
        for _ in range(1200):
            final = loop.run_until_complete(queue.get(job.id))
            if final.status in (SUCCEEDED, FAILED):
                break
            threading.Event().wait(0.05)
    finally:
        worker.stop(0)
        thread.join(30)
        loop.close()
    if final.status == SUCCEEDED:
        assert final.result["seeds"] == [kwargs["seed"] + i for i in range(len(prompts))]
        return None
    assert final.status == FAILED and final.error["code"] == "invalid_request", final.error
    return final.error["field"], final.error["message"]


@pytest.fixture(scope="module")
def pipe(tiny_model):
    return load_pipeline(tiny_model)


@pytest.fixture(scope="module")
def client(embedded):
    with embedded.client() as c:
        yield c


@pytest.mark.parametrize("edge", list(EDGES))
def test_every_front_door_gives_the_same_answer(edge, pipe, client, tiny_model, tmp_path, capsys):
    kwargs, field = EDGES[edge]
    answers = {
        "pipeline": pipeline_answer(pipe, kwargs),
        "cli": cli_answer(tiny_model, kwargs, tmp_path, capsys),
        "http": http_answer(client, kwargs),
        "worker": worker_answer(tiny_model, kwargs),
    }
    if field is None:
        assert set(answers.values()) == {None}, answers
    else:
        assert {a[0] for a in answers.values()} == {field}, answers
        assert len({a[1] for a in answers.values()}) == 1, answers
