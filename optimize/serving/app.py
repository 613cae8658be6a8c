"""The Starlette app of `optimize serve`: the Open Inference Protocol's (KServe v2) routes, health and readiness,
inference through the batcher with its answers (400s, 404, 413, 503 with Retry-After, 500) as JSON errors, and
`/metrics`. Every answered inference request is counted by status code and timed."""

from __future__ import annotations

import json
import time
from typing import TYPE_CHECKING, Any

from optimize import __version__
from optimize.lazy import lazy
from optimize.recipe import ServingSection
from optimize.serving.batcher import Batcher, Overloaded
from optimize.serving.metrics import ServerMetrics
from optimize.serving.protocol import BadRequest, decode_infer, encode_infer, model_metadata

if TYPE_CHECKING:
    from optimize.serving.server import ServedModel

applications = lazy("starlette.applications")
responses = lazy("starlette.responses")
routing = lazy("starlette.routing")

PRIORITY_HEADER = "x-priority"
PRIORITIES = ("high", "low")
PLATFORM = "onnxruntime_onnx"  # Triton's name for an ONNX model served by ONNX Runtime


class _Answer(Exception):
    """An answer other than 200, raised from inside a handler: status, message, extra headers."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.headers = status, message, headers or {}


def error_response(status: int, message: str, headers: dict[str, str] | None = None) -> Any:
    """`{"error": message}` with `status`, as KServe v2 and Triton answer errors."""
    return responses.Response(
        json.dumps({"error": message}), status_code=status, headers=headers, media_type="application/json"
    )


def make_app(model: ServedModel, batcher: Batcher, metrics: ServerMetrics, settings: ServingSection) -> Any:
    """The app serving `model` through `batcher`. `app.state.ready` (set by the server once loaded and warmed) and
    `app.state.draining` (set on SIGTERM) make /v2/health/ready and the model's ready route answer 200 or 503."""
    limit_bytes = int(settings.max_body_mb * 1024 * 1024)
    inputs, outputs = list(model.inputs), list(model.outputs)
    metadata = model_metadata(model.name, [model.version], PLATFORM, model.inputs, model.outputs)

    def serving(request: Any) -> bool:
        return bool(request.app.state.ready and not request.app.state.draining)

    def check_model(request: Any) -> None:
        name, version = request.path_params["name"], request.path_params.get("version")
        if name != model.name:
            raise _Answer(404, f"unknown model {name!r}; this server serves {model.name!r}")
        if version is not None and version != model.version:
            raise _Answer(404, f"model {name!r} has no version {version!r}; it serves version {model.version!r}")

    async def live(request: Any) -> Any:
        return responses.Response(status_code=200)

    async def ready(request: Any) -> Any:
        return responses.Response(status_code=200 if serving(request) else 503)

    async def server_metadata(request: Any) -> Any:
        return responses.JSONResponse(
            {"name": "optimize", "version": __version__, "extensions": ["binary_tensor_data", "parameters"]}
        )

    async def model_meta(request: Any) -> Any:
        try:
            check_model(request)
        except _Answer as a:
            return error_response(a.status, a.message)
        return responses.JSONResponse(metadata)

    async def model_ready(request: Any) -> Any:
        try:
            check_model(request)
        except _Answer as a:
            return error_response(a.status, a.message)
        return responses.Response(status_code=200 if serving(request) else 503)

    async def infer(request: Any) -> Any:
        start = time.perf_counter()
        status = 500
        try:
            check_model(request)
            body = await read_body(request, limit_bytes)
            parsed = decode_infer(body, header_length(request), inputs, outputs)
            priority = request_priority(request, parsed)
            result = await batcher.submit(parsed.inputs, priority=priority, timeout_s=parsed.timeout_s)
            content, headers = encode_infer(
                model.name, model.version, parsed.id, result, parsed.outputs, parsed.binary_output
            )
            status = 200
            return responses.Response(content, status_code=200, headers=headers)
        except BadRequest as e:
            status = e.status
            return error_response(e.status, e.message)
        except _Answer as a:
            status = a.status
            return error_response(a.status, a.message, a.headers)
        except Overloaded as e:
            status = 503
            return error_response(503, e.message, {"Retry-After": str(e.retry_after_s)})
        except Exception as e:  # the model run failed: the caller gets a 500, the server keeps serving
            return error_response(500, f"inference failed: {type(e).__name__}: {e}")
        finally:
            metrics.answered(status, time.perf_counter() - start)

    async def prometheus(request: Any) -> Any:
        content, content_type = metrics.exposition()
        return responses.Response(content, headers={"Content-Type": content_type})

    route = routing.Route
    routes = [
        route("/v2", server_metadata, methods=["GET"]),
        route("/v2/health/live", live, methods=["GET"]),
        route("/v2/health/ready", ready, methods=["GET"]),
        route("/v2/models/{name}", model_meta, methods=["GET"]),
        route("/v2/models/{name}/versions/{version}", model_meta, methods=["GET"]),
        route("/v2/models/{name}/ready", model_ready, methods=["GET"]),
        route("/v2/models/{name}/versions/{version}/ready", model_ready, methods=["GET"]),
        route("/v2/models/{name}/infer", infer, methods=["POST"]),
        route("/v2/models/{name}/versions/{version}/infer", infer, methods=["POST"]),
        route("/metrics", prometheus, methods=["GET"]),
    ]
    app = applications.Starlette(routes=routes, exception_handlers={404: http_error, 405: http_error})
    app.state.ready = False
    app.state.draining = False
    return app


async def http_error(request: Any, exc: Any) -> Any:
    """An unknown path (404) or method (405), answered as JSON like every other error."""
    what = "no such path" if exc.status_code == 404 else f"method {request.method} is not allowed"
    return error_response(exc.status_code, f"{what}: {request.url.path}", getattr(exc, "headers", None))


async def read_body(request: Any, limit_bytes: int) -> bytes:
    """The request body, whatever its Content-Type; past `limit_bytes` (by Content-Length, or while it streams
    in) a 413 without reading the rest."""
    declared = request.headers.get("content-length")
    if declared is not None:
        try:
            if int(declared) > limit_bytes:
                raise _Answer(413, _too_large(int(declared), limit_bytes))
        except ValueError:
            raise _Answer(400, f"Content-Length {declared!r} is not a number") from None
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit_bytes:
            raise _Answer(413, _too_large(size, limit_bytes))
        chunks.append(chunk)
    return b"".join(chunks)


def _too_large(size: int, limit_bytes: int) -> str:
    return (
        f"request body of {size} bytes or more is over the limit of {limit_bytes} bytes "
        f"(serving.max_body_mb {limit_bytes / 1024 / 1024:g}); send fewer rows per request"
    )


def header_length(request: Any) -> int | None:
    """The binary tensor extension's `Inference-Header-Content-Length` (None when the body is all JSON)."""
    value = request.headers.get("inference-header-content-length")
    if value is None:
        return None
    try:
        return int(value)
    except ValueError:
        raise _Answer(400, f"Inference-Header-Content-Length {value!r} is not a number") from None


def request_priority(request: Any, parsed: Any) -> str:
    """The request's `priority` parameter when it has one, else its `X-Priority: high|low` header, else low."""
    if "priority" in (parsed.parameters or {}):
        return str(parsed.priority)
    value = request.headers.get(PRIORITY_HEADER)
    if value is None:
        return "low"
    value = value.strip().lower()
    if value not in PRIORITIES:
        raise _Answer(400, f"X-Priority {value!r}: use high or low")
    return value
