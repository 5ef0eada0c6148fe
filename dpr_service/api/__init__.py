"""The web service: thin FastAPI routers over the core (checkpoint, Searcher, loss, encoder).

Import ``dpr_service.api.app:create_app``; the api imports only ``dpr_service.core`` (and third-party
packages), and nothing in the core, ``index`` or ``trainer`` imports this package.
"""
