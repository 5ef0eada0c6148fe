"""The web service: thin FastAPI routes over the core and the index's Searcher.

Import ``dpr_service.api.app:create_app``; nothing in ``dpr_service.core`` imports this package.
"""
