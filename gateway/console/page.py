"""The console's HTML: Jinja2 templates with autoescaping, and the page's security headers."""

from __future__ import annotations

import base64
import hashlib
from importlib.resources import files
from typing import Final

from jinja2 import Environment, PackageLoader, StrictUndefined
from markupsafe import Markup

from gateway.console.view import ConsolePage


def build_csp(css: str) -> str:
    """The Content-Security-Policy of console pages: no scripts, no external anything; the one
    inline stylesheet allowed by its hash; forms post only here; no framing."""
    digest = base64.b64encode(hashlib.sha256(css.encode("utf-8")).digest()).decode("ascii")
    return (
        f"default-src 'none'; style-src 'sha256-{digest}'; form-action 'self'; "
        "frame-ancestors 'none'; base-uri 'none'"
    )


SECURITY_HEADERS: Final = {
    "X-Frame-Options": "DENY",
    "Cache-Control": "no-store",
    "Referrer-Policy": "no-referrer",
    "X-Content-Type-Options": "nosniff",
}


class PageRenderer:
    """Renders the console and its login form; every value is escaped by the template engine."""

    def __init__(self) -> None:
        self._env = Environment(
            loader=PackageLoader("gateway.console", "templates"),
            autoescape=True,
            undefined=StrictUndefined,
            trim_blocks=True,
            lstrip_blocks=True,
        )
        css = files("gateway.console").joinpath("templates/console.css").read_text("utf-8")
        self._css = Markup(css)  # our own file, not input: inserted as is, and hashed for CSP
        self.headers = {**SECURITY_HEADERS, "Content-Security-Policy": build_csp(css)}

    def render_console(self, page: ConsolePage, *, notice: str | None, csrf: str | None) -> str:
        """The console; ``csrf`` None: read-only (no operator token), so no action forms."""
        return self._env.get_template("console.html").render(
            page=page, notice=notice, can_act=csrf is not None, csrf=csrf or "", css=self._css
        )

    def render_login(self, *, notice: str | None) -> str:
        return self._env.get_template("login.html").render(notice=notice, css=self._css)
