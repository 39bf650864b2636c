"""The served model (/v1/models, /v1/models/{id}) and the Core ML bundles for the phone app (/v1/models/mobile).

A model is OpenAI's model object (``id``, ``object``, ``created``, ``owned_by``) with what the model offers;
/v1/models/{id} answers errors in OpenAI's envelope (server/api/errors.py).
"""

import time
from typing import Annotated

from fastapi import APIRouter, Depends, Path, Request
from fastapi.responses import JSONResponse, Response
from starlette.concurrency import run_in_threadpool

from ...mobile import BundleStore, download
from ...security import SAFE_NAME
from ..dependencies import BaseURL, Owner, Queue, get_bundles
from ..errors import APIError
from ..openai_schemas import openai_error_responses
from ..schemas import FORMATS, MAX_N, MobileBundleList, ModelCard, ModelList, error_responses

router = APIRouter(tags=["models"])
Bundles = Annotated[BundleStore, Depends(get_bundles)]
# Documented, not validated: any other name is simply not found (404), like a name not in the listing.
BundleName = Annotated[str, Path(description="a bundle's name", json_schema_extra={"pattern": SAFE_NAME.pattern})]
# Model ids are model directory names; "mobile" is the bundle listing's path, not a model.
ModelId = Annotated[
    str, Path(description="a model's id", json_schema_extra={"pattern": "^(?!mobile$)" + SAFE_NAME.pattern[1:]})
]


def first_seen(request: Request, model_id: str) -> int:
    """When this API process first saw ``model_id`` served: OpenAI's ``created`` (workers report no date)."""
    seen = getattr(request.app.state, "models_seen", None)
    if seen is None:
        seen = request.app.state.models_seen = {}
    return seen.setdefault(model_id, int(time.time()))


async def served_models(request: Request, queue) -> list[dict]:
    """The served model as GET /v1/models lists it (none before a worker has described it)."""
    stats = await queue.stats()
    data = []
    if stats.model is not None:
        m = stats.model
        data.append({
            "id": m["id"],
            "object": "model",
            "created": first_seen(request, m["id"]),
            "owned_by": "snapgen",
            "sizes": m["sizes"],
            "default_size": m["default_size"],
            "default_steps": m["default_steps"],
            "max_steps": m["max_steps"],
            "guidance_scale": m["guidance_scale"],
            "max_prompt_tokens": m["max_prompt_tokens"],
            "max_n": MAX_N,
            "output_formats": list(FORMATS),
            "image_input": bool(m.get("image_input", False)),
            "workers": len(stats.workers),
        })  # fmt: skip
    return data


@router.get("/v1/models", response_model=ModelList, responses=error_responses(401, 403, 503))
async def list_models(request: Request, owner: Owner, queue: Queue):
    return JSONResponse({"object": "list", "data": await served_models(request, queue)})


@router.get("/v1/models/mobile", response_model=MobileBundleList, responses=error_responses(401, 403))
async def list_mobile(owner: Owner, bundles: Bundles, base: BaseURL):
    found = await run_in_threadpool(bundles.list)
    return JSONResponse({"object": "list", "data": [b.entry(base) for b in found]})


@router.get(
    "/v1/models/mobile/{name}",
    summary="Download a Core ML bundle (ETag, Range, X-Content-SHA256)",
    response_class=Response,
    responses={
        200: {"content": {"application/zip": {"schema": {"type": "string", "format": "binary"}}}},
        206: {"description": "the requested byte range"},
        304: {"description": "not modified"},
        416: {"description": "range not satisfiable"},
        **error_responses(401, 403, 404),
    },  # fmt: skip
)
@router.head("/v1/models/mobile/{name}", include_in_schema=False)
async def get_mobile(name: BundleName, request: Request, owner: Owner, bundles: Bundles):
    bundle = await run_in_threadpool(bundles.find, name)
    if bundle is None:
        raise APIError(404, "not_found", f"no mobile bundle named {name!r} (GET /v1/models/mobile lists them)")
    return download(bundle, request.method, request.headers)


# After /v1/models/mobile, which it would otherwise shadow.
@router.get(
    "/v1/models/{model_id}",
    response_model=ModelCard,
    summary="The served model (OpenAI's model object)",
    responses=openai_error_responses(401, 404, 503),
)
async def get_model(model_id: ModelId, request: Request, owner: Owner, queue: Queue):
    for card in await served_models(request, queue):
        if card["id"] == model_id:
            return JSONResponse(card)
    raise APIError(404, "model_not_found", f"the model {model_id!r} does not exist here (GET /v1/models lists it)",
                   field="model")  # fmt: skip
