"""``fourbit serve``: an OpenAI-compatible HTTP server over the 4-bit model, document QA, and a web page.

:class:`~fourbit.serve.engine.Engine` owns the model, its adapters, the embedder and the index and decodes
queued requests in batches; :func:`~fourbit.serve.app.create_app` wraps it in a FastAPI app (imported
only when called: fastapi and uvicorn are needed to serve, not to import this package). Answers are grounded
by :mod:`fourbit.rag.grounding`, as ``rag query``'s are.
"""

from fourbit.serve.engine import AdapterInUse, Engine, GenRequest, QueueFull, Sampling, UnknownModel

__all__ = [
    "AdapterInUse",
    "Engine",
    "GenRequest",
    "QueueFull",
    "Sampling",
    "UnknownModel",
    "create_app",
]


def create_app(engine: Engine, **kwargs):
    """The FastAPI app serving ``engine`` (see :func:`fourbit.serve.app.create_app`)."""
    from fourbit.serve.app import create_app as _create_app

    return _create_app(engine, **kwargs)
