"""The app's routers, one per concern: retrieval (``/search``), loss (``/score``), embeddings
(``/encode``), operations (health, readiness, info, metrics, reload) and web (the page at ``/``
and the API docs, served with their assets from this server)."""

from . import embeddings, loss, operations, retrieval, web

ROUTERS = (retrieval.router, loss.router, embeddings.router, operations.router, web.router)

__all__ = ["ROUTERS"]
