"""The web page at ``GET /``: one static HTML file shipped as package data (inline CSS and JS, no
build step, nothing fetched from other hosts).

The page holds no data, so it needs no key: it asks the user for the key and sends it as
``X-API-Key`` with its own calls to ``/info``, ``/search`` and ``/score``. It is served with a
Content-Security-Policy that allows only its own inline script (by hash) and connections to this
server, so neither a passage's text nor anything else can run script or load from another host.
"""

from __future__ import annotations

import base64
import hashlib
import re
from functools import lru_cache
from pathlib import Path

from fastapi.responses import HTMLResponse

PAGE = Path(__file__).with_name("static") / "index.html"


def inline_script_hashes(html: str) -> str:
    """The CSP sources (``'sha256-...'``, space-separated) that allow exactly the inline
    ``<script>`` elements of ``html`` to run."""
    return " ".join(
        "'sha256-" + base64.b64encode(hashlib.sha256(script.encode()).digest()).decode() + "'"
        for script in re.findall(r"<script>(.*?)</script>", html, re.S))


@lru_cache(maxsize=1)
def _page() -> tuple[str, str]:
    html = PAGE.read_text(encoding="utf-8")
    csp = (f"default-src 'none'; script-src {inline_script_hashes(html)}; style-src 'unsafe-inline'; connect-src 'self'; "
           "img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
    return html, csp


def index_page() -> HTMLResponse:
    """The page, with its Content-Security-Policy and no-cache headers."""
    html, csp = _page()
    return HTMLResponse(html, headers={"Content-Security-Policy": csp, "Cache-Control": "no-cache",
                                       "X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer"})
