"""The request and response models of the OpenAI-compatible Images API (routes/openai_images.py).

Field names and values are OpenAI's, so its clients work unchanged. Fields this server has no use for
(``quality``, ``style``, ``user``, ...) are accepted with OpenAI's values and ignored; what each does here
is in each field's description and in docs/server.md. ``seed``, ``negative_prompt``, ``steps``,
``guidance_scale`` (and ``strength`` for edits) are extensions with the meaning of POST /v1/generate.
Unknown fields are refused (400 naming the field), as OpenAI does, so a typo is not silently ignored.

The JSON body (generations) is strict like POST /v1/generate; the multipart form (edits) carries text,
so its values are parsed from strings.
"""

from typing import Annotated, Any, Literal

from fastapi import UploadFile
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, WithJsonSchema, create_model, field_validator

from .schemas import (
    _VISIBLE,
    DEFAULT_STRENGTH,
    MAX_N,
    MAX_PROMPT_CHARS,
    MAX_SEED,
    Integer,
    OptionalInteger,
    _documented,
    _prompt_field,
)

# "auto" or WIDTHxHEIGHT. The schema states the form; the handler checks it against the model's sizes.
SIZE_PATTERN = r"^(auto|[1-9][0-9]{0,4}x[1-9][0-9]{0,4})$"
IGNORED = "accepted with OpenAI's values and ignored"


def _no_stream(value: bool) -> bool:
    if value:
        raise ValueError("streaming is not supported; leave stream unset or false (POST /v1/generate with "
                         "Prefer: respond-async and GET /v1/jobs/{id}/events stream progress)")  # fmt: skip
    return value


# OpenAI's `stream`: only false is valid here, as a JSON boolean or a form's "false".
NoStream = Annotated[bool, AfterValidator(_no_stream), WithJsonSchema({"type": "boolean", "enum": [False]})]


class ImageRequest(BaseModel):
    """The fields generations and edits share (OpenAI's, then the extensions)."""

    prompt: str = _prompt_field(MAX_PROMPT_CHARS)
    model: str | None = Field(None, description="the served model's id (GET /v1/models); unset: the served model")
    n: Integer = Field(1, ge=1, le=MAX_N, description="number of images; image i uses seed + i")
    size: str | None = _documented(
        "WIDTHxHEIGHT, one of the model's sizes (GET /v1/models lists them as [height, width]); auto or unset: "
        "the model's default size",
        pattern=SIZE_PATTERN,
    )
    response_format: Literal["b64_json", "url"] | None = Field(
        None,
        description="b64_json (default): the image inline; url: a link to GET it (with the same API key, kept "
        "SNAPGEN_RESULT_TTL_S)",
    )
    output_format: Literal["png", "jpeg", "webp"] | None = Field(None, description="the image format; default png")
    quality: Literal["auto", "low", "medium", "high", "xhigh", "max", "standard", "hd"] | None = Field(
        None, description=f"{IGNORED}; `steps` sets the sampling effort"
    )
    complexity: Literal["low", "medium", "high"] | None = Field(None, description=IGNORED)
    background: Literal["auto", "opaque"] | None = Field(
        None, description="the images are opaque: auto and opaque are accepted; transparent is refused"
    )
    output_compression: OptionalInteger = Field(
        None, ge=0, le=100, description=f"0-100, {IGNORED}: JPEG and WebP are written at fixed settings"
    )
    user: str | None = Field(None, description=f"{IGNORED} (not stored)")
    safety_identifier: str | None = Field(None, description=f"{IGNORED} (not stored)")
    stream: NoStream | None = Field(None, description="only false: the answer comes when the images are done")
    partial_images: OptionalInteger = Field(None, ge=0, le=3, description=f"0-3, {IGNORED} (no streaming)")
    # Extensions: as in POST /v1/generate.
    seed: OptionalInteger = _documented(
        "extension: uint32, drawn at random when unset and always returned (data[i].seed, X-Seeds); image i "
        "uses seed + i",
        minimum=0,
        maximum=MAX_SEED,
    )
    negative_prompt: str | None = _prompt_field(MAX_PROMPT_CHARS, negative=True)
    steps: OptionalInteger = _documented(
        "extension: sampling steps, at most the model's max_steps (GET /v1/models); the model's default when unset",
        minimum=1,
    )
    guidance_scale: float | None = _documented("extension: 1 = no guidance; the model's default when unset", minimum=0)

    @field_validator("prompt")
    @classmethod
    def _not_blank(cls, value: str) -> str:
        if not _VISIBLE.search(value):
            raise ValueError("the prompt is empty; write what the image should show")
        return value


class ImageGenerationRequest(ImageRequest):
    """POST /v1/images/generations: OpenAI's body; unset fields take the model's defaults."""

    model_config = ConfigDict(
        extra="forbid",
        strict=True,
        json_schema_extra={"examples": [{"prompt": "a red circle to the left of a blue square", "size": "auto"}]},
    )

    style: Literal["vivid", "natural"] | None = Field(None, description=IGNORED)
    moderation: Literal["low", "auto"] | None = Field(None, description=f"{IGNORED}: there is no moderation")


def _form_schema(schema: dict[str, Any]) -> None:
    """A form field is sent or left out, never null (a form has no null): its schema offers no null."""
    for prop in schema.get("properties", {}).values():
        options = prop.pop("anyOf", None)
        if options is not None:
            kept = [option for option in options if option.get("type") != "null"]
            if len(kept) == 1:
                prop.update(kept[0])
            else:
                prop["anyOf"] = kept
        if "default" in prop and prop["default"] is None:
            del prop["default"]


class ImageEditForm(ImageRequest):
    """POST /v1/images/edits: OpenAI's multipart form. One input image; masks are not supported."""

    model_config = ConfigDict(extra="forbid", json_schema_extra=_form_schema)

    image: UploadFile = Field(
        description="the input image: one PNG, JPEG or WebP file; it is cut to the size's aspect ratio around its "
        "centre and resized",
        json_schema_extra={"format": "binary"},
    )
    input_fidelity: Literal["high", "low"] | None = Field(None, description=f"{IGNORED}; `strength` sets it")
    strength: float | None = Field(
        None,
        ge=0,
        le=1,
        description=f"extension: how far the input goes towards noise, 0 (keep it) to 1 (ignore it); default "
        f"{DEFAULT_STRENGTH}",
    )


def _with_prompt_limit(model: type[ImageRequest], max_prompt_chars: int) -> Any:
    return create_model(
        model.__name__,
        __base__=model,
        __doc__=model.__doc__,
        prompt=(str, _prompt_field(max_prompt_chars)),
        negative_prompt=(str | None, _prompt_field(max_prompt_chars, negative=True)),
    )


def generation_model(max_prompt_chars: int) -> type[ImageGenerationRequest]:
    """ImageGenerationRequest with this server's prompt length limit in its schema."""
    return _with_prompt_limit(ImageGenerationRequest, max_prompt_chars)


def edit_model(max_prompt_chars: int) -> type[ImageEditForm]:
    """ImageEditForm with this server's prompt length limit in its schema."""
    return _with_prompt_limit(ImageEditForm, max_prompt_chars)


# Fields of OpenAI's Images API this server refuses, with why (the 400 says it instead of "unknown parameter").
REFUSED = {
    "mask": "masks are not supported: the whole image is edited; leave mask out",
    "markup": "markup images are not supported; leave markup out",
    "image[]": "one input image per request: send it as the form field `image`",
    "svg": "SVG output is not supported; output_format is png, jpeg or webp",
    "frame_count": "GIF output is not supported; output_format is png, jpeg or webp",
    "frame_duration_ms": "GIF output is not supported; output_format is png, jpeg or webp",
}


class OpenAIImage(BaseModel):
    b64_json: str | None = Field(None, description="the encoded image (response_format b64_json)")
    url: str | None = Field(None, description="where to GET it, with the same API key (response_format url)")
    seed: int = Field(description="extension: the image's seed")


class ImagesResponse(BaseModel):
    """OpenAI's ImagesResponse, with the job's id and the model as extensions."""

    created: int
    data: list[OpenAIImage]
    background: Literal["opaque"]
    output_format: Literal["png", "jpeg", "webp"]
    size: str = Field(description="WIDTHxHEIGHT")
    model: str = Field(description="extension: the model that made the images")
    id: str = Field(description="extension: the job's id (GET /v1/jobs/{id})")


class OpenAIErrorDetail(BaseModel):
    message: str
    type: str = Field(description="invalid_request_error, rate_limit_error or server_error")
    param: str | None = Field(description="the request field at fault, if one is")
    code: str | None


class OpenAIErrorResponse(BaseModel):
    """OpenAI's error envelope, on the OpenAI-compatible routes."""

    error: OpenAIErrorDetail


def openai_error_responses(*codes: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI `responses` for these error statuses, and any other 4xx (a 405, ...), in OpenAI's envelope.

    The 4XX range also keeps FastAPI from documenting its own 422, which these routes never send."""
    other = {"model": OpenAIErrorResponse, "description": "any other client error"}
    return {**{code: {"model": OpenAIErrorResponse} for code in codes}, "4XX": other}
