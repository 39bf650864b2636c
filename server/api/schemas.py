"""The pydantic request and response models of the HTTP API, and the limits they state."""

import re
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, create_model, field_validator

from snapgen.request import MAX_SEED, OUTPUT_FORMATS

MAX_N = 8  # images per HTTP request: the server's policy, not the model's
MAX_PROMPT_CHARS = 20000
DEFAULT_STRENGTH = 0.6
FORMATS = OUTPUT_FORMATS
MEDIA_TYPES = {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp"}
JobStatus = Literal["queued", "running", "succeeded", "failed", "canceled"]

# A prompt needs one character that is not white space. JSON Schema's `\s` (ECMA-262) and Python's
# str.isspace() disagree on \x1c-\x1f, \x85 and \ufeff; naming them makes the schema and the check agree.
VISIBLE_PATTERN = r"[^\s\x1c-\x1f\x85\ufeff]"
_VISIBLE = re.compile(VISIBLE_PATTERN)


def _integral(value: Any) -> Any:
    """JSON Schema counts 4.0 as an integer, so the API takes it as 4; 4.5 stays a float and is refused."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


Integer = Annotated[int, BeforeValidator(_integral)]
OptionalInteger = Annotated[int | None, BeforeValidator(_integral)]


def _prompt_field(max_chars: int, negative: bool = False) -> Any:
    if negative:
        return Field(None, max_length=max_chars, description="what it should not show (guidance != 1)")
    return Field(
        min_length=1,
        max_length=max_chars,
        description="what the image should show",
        json_schema_extra={"pattern": VISIBLE_PATTERN},
    )


def _documented(description: str, **bounds: Any) -> Any:
    """A field whose limits the schema states but the generation contract (``snapgen.request``) enforces,
    so the HTTP API, the CLI and the worker refuse the same values with the same message."""
    return Field(None, description=description, json_schema_extra=bounds)


class GenerateRequest(BaseModel):
    """POST /v1/generate. Unset fields take the model's defaults (see GET /v1/models).

    The body is parsed here (JSON types, the HTTP limits on n and prompt length); its values are checked
    by ``snapgen.request.GenerationRequest`` against the served model, which is what every front door uses.
    """

    model_config = ConfigDict(
        extra="forbid",
        strict=True,
        json_schema_extra={"examples": [{"prompt": "a red circle to the left of a blue square", "seed": 3}]},
    )

    prompt: str = _prompt_field(MAX_PROMPT_CHARS)
    negative_prompt: str | None = _prompt_field(MAX_PROMPT_CHARS, negative=True)
    n: Integer = Field(1, ge=1, le=MAX_N, description="number of images; image i uses seed + i")
    width: OptionalInteger = _documented("pixels; one of the model's sizes (GET /v1/models)", minimum=8, maximum=4096)
    height: OptionalInteger = _documented("pixels; one of the model's sizes (GET /v1/models)", minimum=8, maximum=4096)
    steps: OptionalInteger = _documented(
        "sampling steps, at most the model's max_steps (GET /v1/models); the model's default when unset", minimum=1
    )
    guidance_scale: float | None = _documented("1 = no guidance; the model's default when unset", minimum=0)
    seed: OptionalInteger = _documented(
        "uint32, drawn at random when unset and always returned; image i uses seed + i, which must stay a uint32",
        minimum=0,
        maximum=MAX_SEED,
    )
    output_format: Literal["png", "jpeg", "webp"] = "png"
    response_format: Literal["b64_json", "url"] = "b64_json"
    image: str | None = Field(
        None,
        description="image-to-image: the input image, base64 of a PNG, JPEG or WebP or a data: URL; it is cut to "
        "the requested size's aspect ratio around its centre and resized (needs a model with an encoder: "
        "GET /v1/models `image_input`)",
    )
    strength: float | None = _documented(
        f"image-to-image: how far the input goes towards noise, 0 (keep it) to 1 (ignore it); default "
        f"{DEFAULT_STRENGTH} with an image",
        minimum=0,
        maximum=1,
    )
    preview: bool = Field(False, description="progress events carry a small JPEG of each step's estimate")
    webhook: str | None = Field(
        None,
        max_length=2048,
        description="an http(s) URL that receives the job's events as signed POST requests (Standard Webhooks; "
        "docs/server.md, Webhooks); this server's SNAPGEN_WEBHOOK_ALLOWED_HOSTS says which hosts may",
    )
    webhook_events_filter: list[Literal["start", "output", "logs", "completed"]] | None = Field(
        None,
        min_length=1,
        description="the events sent to the webhook (Cog's names): start, output (progress, each step), completed; "
        "logs is accepted and never sent; default: all of them",
    )

    @field_validator("prompt")
    @classmethod
    def _not_blank(cls, value: str) -> str:
        if not _VISIBLE.search(value):
            raise ValueError("the prompt is empty; write what the image should show")
        return value


def request_model(max_prompt_chars: int) -> type[GenerateRequest]:
    """GenerateRequest with this server's prompt length limit in its schema."""
    return create_model(
        "GenerateRequest",
        __base__=GenerateRequest,
        __doc__=GenerateRequest.__doc__,
        prompt=(str, _prompt_field(max_prompt_chars)),
        negative_prompt=(str | None, _prompt_field(max_prompt_chars, negative=True)),
    )


class ImageData(BaseModel):
    b64_json: str | None = Field(None, description="the encoded image (response_format=b64_json)")
    url: str | None = Field(None, description="where to GET it (response_format=url)")
    seed: int


class Timings(BaseModel):
    queue_s: float = Field(description="accepted -> a worker started it")
    text_s: float
    unet_s: float
    decode_s: float
    total_s: float = Field(description="accepted -> result stored")


class GenerateResponse(BaseModel):
    id: str
    created: int
    model: str
    data: list[ImageData]
    timings: Timings


class JobAccepted(BaseModel):
    id: str
    status: JobStatus
    queue_position: int | None = None


class Progress(BaseModel):
    step: int
    steps: int


class ProgressEvent(Progress):
    """The data of a `progress` server-sent event."""

    preview: str | None = Field(None, description="jobs with `preview`: a data: URL of a small JPEG of the step")


class JobStatusEvent(BaseModel):
    """The data of a `status` server-sent event."""

    id: str
    status: JobStatus
    queue_position: int | None
    cancel_requested: bool


class ErrorDetail(BaseModel):
    code: str
    message: str
    field: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorDetail


class JobResponse(BaseModel):
    id: str
    status: JobStatus
    created: int
    progress: Progress
    queue_position: int | None = Field(None, description="jobs ahead of this one (queued only)")
    cancel_requested: bool
    request: dict[str, Any]
    result: GenerateResponse | None = None
    error: ErrorDetail | None = None


class ModelCard(BaseModel):
    """The served model: OpenAI's model object (id, object, created, owned_by), then what it offers."""

    id: str
    object: Literal["model"] = "model"
    created: int = Field(description="Unix time this API process first saw a worker serve the model")
    owned_by: str = "snapgen"
    sizes: list[list[int]]
    default_size: list[int]
    default_steps: int
    max_steps: int
    guidance_scale: float
    max_prompt_tokens: int
    max_n: int
    output_formats: list[str]
    image_input: bool = Field(description="whether it takes an input image (image-to-image: it has an encoder)")
    workers: int


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class MobileBundle(BaseModel):
    name: str
    version: str | None
    size: int
    sha256: str
    created: str
    content_type: str
    url: str


class MobileBundleList(BaseModel):
    object: Literal["list"] = "list"
    data: list[MobileBundle]


class Health(BaseModel):
    status: Literal["ok"]


class Readiness(BaseModel):
    status: Literal["ready", "not_ready"]
    checks: dict[str, str] = Field(description="queue and model: `ok...` or what is wrong")
    error: ErrorDetail | None = Field(None, description="not ready: the failing checks")


def error_responses(*codes: int, media_type: str | None = None) -> dict[int | str, dict[str, Any]]:
    """OpenAPI `responses` for these error statuses, each with the error envelope (JSON).

    A route whose own responses are not JSON (server-sent events) names ``media_type``: FastAPI
    would otherwise file the envelope under that route's media type. The ErrorResponse schema is
    in the document through the other routes.
    """
    if media_type is None:
        return {code: {"model": ErrorResponse} for code in codes}
    schema = {"$ref": "#/components/schemas/ErrorResponse"}
    return {code: {"content": {"application/json": {"schema": schema}}} for code in codes}


BINARY = {"schema": {"type": "string", "format": "binary"}}
