"""`finegrain serve MODEL`: the model behind an HTTP service (FastAPI on uvicorn) with its page at GET /."""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from finegrain.errors import FinegrainError

# module names; python-multipart is `python_multipart` since 0.0.13, `multipart` before
SERVE_EXTRAS = {"fastapi": ("fastapi",), "uvicorn": ("uvicorn",), "python-multipart": ("python_multipart", "multipart")}


def check_serve_extras() -> None:
    """FinegrainError (one line) when the optional web stack is not installed."""
    missing = [name for name, modules in SERVE_EXTRAS.items() if not any(map(_importable, modules))]
    if missing:
        raise FinegrainError(f"finegrain serve needs {', '.join(missing)}: pip install 'finegrain[serve]'")


def _importable(module: str) -> bool:
    try:
        importlib.import_module(module)
    except ImportError:
        return False
    return True


def _batch_size(text) -> int | str:
    if str(text) == "auto":
        return "auto"
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise FinegrainError(f"--max-batch must be auto or an integer >= 1, got {text!r}")
    return value


def cmd_serve(args: argparse.Namespace) -> int:
    from finegrain.cli.commands import _cli_config, _overrides
    from finegrain.config import ServeConfig, config_choices

    args = _cli_config(ServeConfig, args, _overrides(args, ServeConfig), config_choices(ServeConfig))
    if not os.path.exists(args.model):
        raise FinegrainError(f"no model at {args.model}: give a model folder (or a run folder) saved by finegrain")
    if not 0 <= args.port < 65536:
        raise FinegrainError(f"--port must be between 0 and 65535, got {args.port}")
    max_batch = _batch_size(args.max_batch)
    if args.max_wait_ms < 0 or args.max_upload_mb <= 0 or args.k < 1:
        raise FinegrainError("-k must be >= 1, --max-wait-ms >= 0, --max-upload-mb > 0")
    check_serve_extras()
    from finegrain.serve import create_app, run_server

    app = create_app(
        args.model,
        device=args.device,
        runtime=args.runtime,
        max_batch=max_batch,
        max_wait_ms=args.max_wait_ms,
        max_upload_bytes=int(args.max_upload_mb * 1024 * 1024),
        default_k=args.k,
    )
    service = app.state.service
    measured = service.measured and ", ".join(f"{k}: {v:.1f}" for k, v in service.measured.items())
    how = f" (measured images/s by batch size: {measured})" if measured else ""
    print(
        f"finegrain serve: {len(service.served.classes)} classes from {args.model}, batches of up to "
        f"{service.batcher.max_batch}{how}; page and API on "
        f"http://{args.host}:{args.port}/ (Ctrl-C stops)",
        file=sys.stderr,
        flush=True,
    )
    run_server(app, host=args.host, port=args.port, log_level=args.log_level)
    return 0
