"""Schemathesis hooks for test_server_schemathesis.py (loaded by tests/server/schemathesis.toml).

POST /v1/generate takes what the loaded model allows (GET /v1/models lists it), which a static schema
cannot state, and one rule that spans two fields:
- width and height must be one of the model's sizes (the schema says 8..4096): a generated in-range
  size becomes the test model's one size, 128;
- steps must be at most the model's max_steps (the schema says >= 1): larger ones become 50;
- image i uses seed + i, so seed + n - 1 must stay a uint32: a seed too close to the top moves down;
- a webhook URL must be one the server's allow-list takes (its host resolved), and the test server has no
  signing secret: a generated webhook is left out, and so is a valid events filter (it needs a webhook);
- the test model has no encoder: a generated input image is left out, and so is a valid strength (it needs one).
The OpenAI-compatible routes (/v1/images/generations, /v1/images/edits) take the same values, with the
size as WIDTHxHEIGHT (a generated one becomes 128x128), and wait for the job: a prompt longer than the
model's token limit (checked by the worker, which alone has the tokenizer) would fail the request, so
schema-valid prompts are cut to a length that fits.
Values outside the schema (negative cases) are left alone, so valid requests stay valid and invalid
ones invalid.
"""

import re

import schemathesis

MODEL_SIZE = 128  # the test model's only size; the test checks GET /v1/models says so
MODEL_MAX_STEPS = 50  # ... and its max_steps
MAX_SEED = 2**32 - 1
WEBHOOK_EVENTS = ("start", "output", "logs", "completed")
GENERATE_PATHS = ("/v1/generate", "/v1/images/generations", "/v1/images/edits")
OPENAI_PATHS = ("/v1/images/generations", "/v1/images/edits")
WIDTH_X_HEIGHT = re.compile(r"[1-9][0-9]{0,4}x[1-9][0-9]{0,4}")
VISIBLE = re.compile(r"[^\s\x1c-\x1f\x85\ufeff]")  # server/api/schemas.py VISIBLE_PATTERN
PROMPT_CHARS = 20  # well under the test model's 32 tokens, whatever the characters
MAX_PROMPT_CHARS = 2000  # the server's default SNAPGEN_MAX_PROMPT_CHARS


def _in_schema(value) -> bool:
    return type(value) in (int, float) and 8 <= value <= 4096 and float(value).is_integer()


@schemathesis.hook("map_case")
def model_sizes(context, case):
    if case.operation.path in GENERATE_PATHS and isinstance(case.body, dict):
        for name in ("width", "height"):
            if _in_schema(case.body.get(name)):
                case.body[name] = type(case.body[name])(MODEL_SIZE)  # 4.0 stays a float: integral floats are valid
        steps = case.body.get("steps")
        if _integral(steps) and steps > MODEL_MAX_STEPS:
            case.body["steps"] = type(steps)(MODEL_MAX_STEPS)
        seed, n = case.body.get("seed"), case.body.get("n", 1)
        if _integral(seed) and 0 <= seed <= MAX_SEED and _integral(n) and 1 <= n <= 8 and seed + n - 1 > MAX_SEED:
            case.body["seed"] = type(seed)(MAX_SEED - n + 1)
        if isinstance(case.body.get("webhook"), str) and len(case.body["webhook"]) <= 2048:
            del case.body["webhook"]
        events = case.body.get("webhook_events_filter")
        if isinstance(events, list) and events and all(e in WEBHOOK_EVENTS for e in events):
            del case.body["webhook_events_filter"]  # valid, but nothing to filter without a webhook
        if case.operation.path == "/v1/generate":
            _text_to_image(case.body)
        if case.operation.path in OPENAI_PATHS:
            _fit_openai(case.body)
    return case


def _text_to_image(body: dict) -> None:
    # Any string is a schema-valid image, and the test model has no encoder: every image is refused (422),
    # and a strength without an image too. Image-to-image is tested in test_server_image_input.py.
    if isinstance(body.get("image"), str):
        del body["image"]
    strength = body.get("strength")
    if body.get("image") is None and type(strength) in (int, float) and 0 <= strength <= 1:
        del body["strength"]


def _fit_openai(body: dict) -> None:
    size = body.get("size")
    if isinstance(size, str) and WIDTH_X_HEIGHT.fullmatch(size):
        body["size"] = f"{MODEL_SIZE}x{MODEL_SIZE}"
    prompt = body.get("prompt")
    if isinstance(prompt, str) and len(prompt) <= MAX_PROMPT_CHARS and VISIBLE.search(prompt):
        body["prompt"] = prompt[:PROMPT_CHARS] if VISIBLE.search(prompt[:PROMPT_CHARS]) else "a red circle"
    negative = body.get("negative_prompt")
    if isinstance(negative, str) and len(negative) <= MAX_PROMPT_CHARS:
        body["negative_prompt"] = negative[:PROMPT_CHARS]


def _integral(value) -> bool:
    return type(value) in (int, float) and float(value).is_integer()
