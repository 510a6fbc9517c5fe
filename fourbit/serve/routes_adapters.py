"""Adapters loaded and unloaded while serving, under vLLM's names: ``POST /v1/load_lora_adapter``
``{"lora_name", "lora_path"}`` and ``POST /v1/unload_lora_adapter`` ``{"lora_name"}``.

Both are behind the API key like every /v1 endpoint (:mod:`.guard`). The engine makes the change between two
decode steps (:meth:`fourbit.serve.engine.Engine.load_adapter`), so running requests go on; the answer comes
once the change is made, and ``GET /v1/models`` lists the adapters then served. Errors: a bad ``lora_path``
(missing, not an adapter, an adapter of another model) or a ``lora_name`` already loaded is a 400 naming the
field; unloading an unknown name is a 404, one that running or queued requests use a 409.
"""

import asyncio
from typing import Any

from fastapi import APIRouter, Request
from starlette.concurrency import run_in_threadpool

from fourbit.serve.bodies import LoadLoRARequest, UnloadLoRARequest
from fourbit.serve.engine import AdapterInUse, Engine, UnknownModel
from fourbit.serve.errors import APIError

__all__ = ["router"]

router = APIRouter()


@router.post("/v1/load_lora_adapter")
async def load_lora_adapter(body: LoadLoRARequest, request: Request) -> dict[str, Any]:
    engine: Engine = request.app.state.engine
    loading = await run_in_threadpool(engine.load_adapter, body.lora_name, body.lora_path)  # reads its config
    await asyncio.wrap_future(loading)
    return {"object": "lora_adapter", "lora_name": body.lora_name, "status": "loaded",
            "message": f"LoRA adapter {body.lora_name!r} added successfully", "models": engine.models}


@router.post("/v1/unload_lora_adapter")
async def unload_lora_adapter(body: UnloadLoRARequest, request: Request) -> dict[str, Any]:
    engine: Engine = request.app.state.engine
    try:
        await asyncio.wrap_future(engine.unload_adapter(body.lora_name))
    except UnknownModel:
        raise APIError(404, f"lora_name: no adapter named {body.lora_name!r} is loaded (loaded: "
                            f"{', '.join(engine.adapter_names) or 'none'})", param="lora_name",
                       code="adapter_not_found") from None
    except AdapterInUse as err:
        raise APIError(409, f"lora_name: {err}", param="lora_name", code="adapter_in_use") from None
    return {"object": "lora_adapter", "lora_name": body.lora_name, "status": "unloaded",
            "message": f"LoRA adapter {body.lora_name!r} removed successfully", "models": engine.models}
