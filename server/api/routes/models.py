"""The served model (/v1/models) and the Core ML bundles for the phone app (/v1/models/mobile)."""

from typing import Annotated

from fastapi import APIRouter, Depends, Path, Request
from fastapi.responses import JSONResponse, Response
from starlette.concurrency import run_in_threadpool

from ...mobile import BundleStore, download
from ...security import SAFE_NAME
from ..dependencies import BaseURL, Owner, Queue, get_bundles
from ..errors import APIError
from ..schemas import FORMATS, MAX_N, MobileBundleList, ModelList, error_responses

router = APIRouter(tags=["models"])
Bundles = Annotated[BundleStore, Depends(get_bundles)]
# Documented, not validated: any other name is simply not found (404), like a name not in the listing.
BundleName = Annotated[str, Path(description="a bundle's name", json_schema_extra={"pattern": SAFE_NAME.pattern})]


@router.get("/v1/models", response_model=ModelList, responses=error_responses(401, 403, 503))
async def list_models(owner: Owner, queue: Queue):
    stats = await queue.stats()
    data = []
    if stats.model is not None:
        m = stats.model
        data.append({
            "id": m["id"],
            "sizes": m["sizes"],
            "default_size": m["default_size"],
            "default_steps": m["default_steps"],
            "max_steps": m["max_steps"],
            "guidance_scale": m["guidance_scale"],
            "max_prompt_tokens": m["max_prompt_tokens"],
            "max_n": MAX_N,
            "output_formats": list(FORMATS),
            "workers": len(stats.workers),
        })  # fmt: skip
    return JSONResponse({"object": "list", "data": data})


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
