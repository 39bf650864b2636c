"""Schemathesis hooks for test_server_schemathesis.py (loaded by tests/server/schemathesis.toml).

POST /v1/generate takes what the loaded model allows (GET /v1/models lists it), which a static schema
cannot state, and one rule that spans two fields:
- width and height must be one of the model's sizes (the schema says 8..4096): a generated in-range
  size becomes the test model's one size, 128;
- steps must be at most the model's max_steps (the schema says >= 1): larger ones become 50;
- image i uses seed + i, so seed + n - 1 must stay a uint32: a seed too close to the top moves down.
Values outside the schema (negative cases) are left alone, so valid requests stay valid and invalid
ones invalid.
"""

import schemathesis

MODEL_SIZE = 128  # the test model's only size; the test checks GET /v1/models says so
MODEL_MAX_STEPS = 50  # ... and its max_steps
MAX_SEED = 2**32 - 1


def _in_schema(value) -> bool:
    return type(value) in (int, float) and 8 <= value <= 4096 and float(value).is_integer()


@schemathesis.hook("map_case")
def model_sizes(context, case):
    if case.operation.path == "/v1/generate" and isinstance(case.body, dict):
        for name in ("width", "height"):
            if _in_schema(case.body.get(name)):
                case.body[name] = type(case.body[name])(MODEL_SIZE)  # 4.0 stays a float: integral floats are valid
        steps = case.body.get("steps")
        if _integral(steps) and steps > MODEL_MAX_STEPS:
            case.body["steps"] = type(steps)(MODEL_MAX_STEPS)
        seed, n = case.body.get("seed"), case.body.get("n", 1)
        if _integral(seed) and 0 <= seed <= MAX_SEED and _integral(n) and 1 <= n <= 8 and seed + n - 1 > MAX_SEED:
            case.body["seed"] = type(seed)(MAX_SEED - n + 1)
    return case


def _integral(value) -> bool:
    return type(value) in (int, float) and float(value).is_integer()
