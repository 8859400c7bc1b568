"""The ASGI service: FastAPI routes over a ServedModel, a MicroBatcher and the upload rules.

GET /          the page (serve/page.py): pick or drop a photo, see the top-5, the CAM, similar training images
GET /health    liveness and counters: requests, refusals, batches and their sizes
GET /model     classes, preprocessing, kind, gallery, metrics found beside the model, limits
POST /predict  one image (multipart field `image`, or a raw image body); `k` (default 5), `cam=true`,
               `neighbours=true`, `coverage=0.9` (a calibrated model: the prediction set and the unknown flag)
               as form fields or query parameters -> JSON top-k with probabilities
GET /gallery/N the training image of gallery row N (k-NN models whose training files were found), as a thumbnail

Refusals are JSON `{"error": reason, "status": code}` with a 4xx code; the service keeps serving after any of them.
"""

# no `from __future__ import annotations`: FastAPI reads the route annotations (Request) at runtime

import asyncio
import contextlib
import logging
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from finegrain.errors import FinegrainError
from finegrain.serve.batcher import MicroBatcher
from finegrain.serve.model import ServedModel, load_predictor
from finegrain.serve.page import PAGE_CSP, page_html
from finegrain.serve.uploads import MAX_PIXELS, MAX_UPLOAD_BYTES, UploadError, decode_upload, read_upload

TRUE = ("1", "true", "yes", "on")
AUTO_CEILING = 16  # the largest batch size max_batch="auto" tries


def _served(model, *, device: str, runtime: str | None) -> ServedModel:
    if isinstance(model, ServedModel):
        return model
    if isinstance(model, str):
        return ServedModel(load_predictor(model, device=device, runtime=runtime), path=model)
    return ServedModel(model)


def best_batch_size(speeds: dict[int, float], *, min_gain: float = 1.05) -> int:
    """The batch size to serve with: the smallest whose images/s no larger size beats by `min_gain` (timing noise
    must not buy latency)."""
    best = min(speeds)
    for size in sorted(speeds):
        if speeds[size] >= min_gain * speeds[best]:
            best = size
    return best


def _param_k(params, default: int, n_classes: int) -> int:
    text = params.get("k")
    if text in (None, ""):
        return min(default, n_classes)
    try:
        k = int(text)
    except ValueError:
        raise UploadError(422, f"k must be an integer between 1 and {n_classes}, got {text!r}") from None
    if not 1 <= k <= n_classes:
        raise UploadError(422, f"k must be an integer between 1 and {n_classes}, got {k}")
    return k


def _param_coverage(params, served: ServedModel) -> float | None:
    """`coverage` (a number in (0, 1)) when asked for, refused up front when the model has no calibration."""
    text = params.get("coverage")
    if text in (None, ""):
        return None
    if served.predictor.conformal is None:
        raise UploadError(422, "this model has no calibration for prediction sets: `finegrain fit` saves one")
    try:
        coverage = float(text)
    except ValueError:
        coverage = -1.0
    if not 0 < coverage < 1:
        raise UploadError(422, f"coverage must be a number between 0 and 1 (e.g. 0.9), got {text!r}")
    return coverage


def _error(status: int, reason: str):
    from fastapi.responses import JSONResponse

    return JSONResponse({"error": reason, "status": status}, status_code=status)


class _Service:
    """State shared by the routes: the model, the batcher, its model thread, limits and counters."""

    def __init__(self, served: ServedModel, *, max_batch: int | str, max_wait_ms: float, max_upload_bytes: int,
                 max_pixels: int, default_k: int) -> None:  # fmt: skip
        self.served, self.default_k = served, default_k
        self.max_upload_bytes, self.max_pixels = max_upload_bytes, max_pixels
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="finegrain-model")
        self.measured: dict[int, float] | None = None
        if max_batch == "auto":
            self.measured = served.measure_batch_sizes(AUTO_CEILING)
            max_batch = best_batch_size(self.measured)
        else:
            served.warm_up()  # the first request must not pay for allocations and the engine choice
        self.batcher = MicroBatcher(
            served.predict_batch, executor=self.executor, max_batch=max_batch, max_wait_ms=max_wait_ms
        )
        self.counts: Counter[str] = Counter()
        self.started = time.time()

    async def in_model_thread(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self.executor, fn, *args)

    async def predict(self, request) -> dict:
        start = time.perf_counter()
        data, fields = await read_upload(request, self.max_upload_bytes)
        params = {**fields, **request.query_params}
        k = _param_k(params, self.default_k, len(self.served.classes))  # before decoding: the cheap refusals first
        coverage = _param_coverage(params, self.served)
        image = await asyncio.to_thread(decode_upload, data, min_side=self.served.min_side, max_pixels=self.max_pixels)
        proba = await self.batcher.submit(image)
        top = np.argsort(-proba)[:k]
        out = {
            "top": [{"class": self.served.classes[j], "probability": round(float(proba[j]), 6)} for j in top],
            "k": k,
        }
        if coverage is not None:
            answer = self.served.predictor.answers(proba[None], coverage)[0]
            out["set"] = [{"class": c, "probability": round(p, 6)} for c, p in answer["set"]]
            out |= {"coverage": coverage, "unknown": answer["unknown"]}
        if str(params.get("cam", "")).lower() in TRUE:
            out["cam"] = await self.in_model_thread(self.served.cam, image)
            zoom = await self.in_model_thread(self.served.zoom_box, image)
            if zoom is not None:
                out["zoom"] = zoom  # where a look-closer model looked closer, as fractions of the photo
        if str(params.get("neighbours", params.get("neighbors", ""))).lower() in TRUE:
            out["neighbours"] = await self.in_model_thread(self.served.neighbours, image)
            out["neighbours_note"] = self.served.gallery_note
        out["time_ms"] = round((time.perf_counter() - start) * 1000, 2)
        return out

    def health(self) -> dict:
        return {
            "status": "ok",
            "uptime_s": round(time.time() - self.started, 1),
            "counts": dict(self.counts),
            "batching": self.batcher.stats(),
        }

    def describe(self) -> dict:
        limits = {"max_upload_bytes": self.max_upload_bytes, "max_pixels": self.max_pixels}
        batching = {"max_batch": self.batcher.max_batch, "max_wait_ms": self.batcher.max_wait * 1000}
        if self.measured is not None:
            batching["measured_images_per_s"] = {str(k): round(v, 1) for k, v in self.measured.items()}
        return {**self.served.describe(), "limits": limits, "batching": batching, "default_k": self.default_k}


def create_app(
    model,
    *,
    device: str = "cpu",
    runtime: str | None = None,
    max_batch: int | str = "auto",
    max_wait_ms: float = 5.0,
    max_upload_bytes: int = MAX_UPLOAD_BYTES,
    max_pixels: int = MAX_PIXELS,
    default_k: int = 5,
):
    """The FastAPI app serving `model`: a model folder path (loaded on `device` with `runtime`), a loaded
    Predictor / Ensemble, or a ServedModel. Run it with `run_server` or any ASGI server (uvicorn app:...).

    max_batch: the most images run together; "auto" measures images/s at batch sizes 1, 2, 4, ... (up to 16) on
    this machine first and takes the fastest (1 where batching does not pay). max_wait_ms: how long the first
    waiting request may wait for others to fill its batch."""
    from fastapi import FastAPI

    if max_batch != "auto" and not (isinstance(max_batch, int) and max_batch >= 1):
        raise FinegrainError(f"max_batch must be auto or an integer >= 1, got {max_batch!r}")
    if max_wait_ms < 0 or max_upload_bytes < 1 or max_pixels < 1 or default_k < 1:
        raise FinegrainError("max_upload_bytes, max_pixels and default_k must be >= 1, max_wait_ms >= 0")
    service = _Service(
        _served(model, device=device, runtime=runtime), max_batch=max_batch, max_wait_ms=max_wait_ms,
        max_upload_bytes=max_upload_bytes, max_pixels=max_pixels, default_k=default_k,
    )  # fmt: skip

    @contextlib.asynccontextmanager
    async def lifespan(app):
        service.batcher.start()
        try:
            yield
        finally:
            await service.batcher.stop()
            service.executor.shutdown(wait=False)

    app = FastAPI(title="finegrain", lifespan=lifespan, docs_url="/docs", redoc_url=None)
    app.state.service = service
    _add_error_handlers(app)
    _add_routes(app, service)
    return app


def _add_error_handlers(app) -> None:
    """Every refusal in the same JSON shape: {"error": reason, "status": code}."""
    from fastapi import Request
    from fastapi.exceptions import RequestValidationError
    from starlette.exceptions import HTTPException

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException):
        return _error(exc.status_code, str(exc.detail))

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError):
        return _error(422, "; ".join(str(e.get("msg")) for e in exc.errors()) or "invalid request")


def _add_routes(app, service: _Service) -> None:
    from fastapi import Request
    from fastapi.responses import HTMLResponse, Response

    @app.get("/", response_class=HTMLResponse)
    async def page():
        return HTMLResponse(page_html(), headers={"Content-Security-Policy": PAGE_CSP})

    @app.get("/health")
    async def health():
        return service.health()

    @app.get("/model")
    async def describe():
        return service.describe()

    @app.post("/predict")
    async def predict(request: Request):
        try:
            out = await service.predict(request)
        except UploadError as e:
            service.counts[f"refused_{e.status}"] += 1
            return _error(e.status, e.reason)
        except Exception as e:  # noqa: BLE001 - a fault of the service itself: said in JSON, logged, and served on
            service.counts["failed_500"] += 1
            logging.getLogger("finegrain.serve").exception("predict failed")
            return _error(500, f"internal error ({type(e).__name__}: {e})")
        service.counts["predicted"] += 1
        return out

    @app.get("/gallery/{row}")
    async def gallery(row: int):
        try:
            data = await asyncio.to_thread(service.served.gallery_thumbnail, row)
        except Exception as e:  # noqa: BLE001 - no such row, or its file is gone or unreadable
            return _error(404, str(e) if isinstance(e, FinegrainError) else f"no gallery image {row}: {e}")
        return Response(data, media_type="image/jpeg", headers={"Cache-Control": "max-age=3600"})


def run_server(app, *, host: str = "127.0.0.1", port: int = 8000, log_level: str = "info") -> None:
    """Serve `app` with uvicorn until interrupted (Ctrl-C)."""
    import uvicorn

    uvicorn.run(app, host=host, port=port, log_level=log_level, timeout_keep_alive=30)
