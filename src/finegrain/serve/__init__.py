"""`finegrain serve`: a model behind an ASGI service (FastAPI on uvicorn) with micro-batching, and a page to try it.

    from finegrain.serve import create_app, run_server
    run_server(create_app("runs/m/model"), port=8000)

FastAPI and uvicorn are optional (`pip install 'finegrain[serve]'`): they are imported when an app is created.
"""

from finegrain.serve.app import create_app, run_server
from finegrain.serve.batcher import MicroBatcher
from finegrain.serve.model import ServedModel, load_predictor
from finegrain.serve.uploads import MAX_PIXELS, MAX_UPLOAD_BYTES, UploadError, decode_upload

__all__ = [
    "MAX_PIXELS",
    "MAX_UPLOAD_BYTES",
    "MicroBatcher",
    "ServedModel",
    "UploadError",
    "create_app",
    "decode_upload",
    "load_predictor",
    "run_server",
]
