"""The operator console on the admin port (contract section 12): one page, two actions.

``view.py`` turns what the gateway already knows (metrics, the request log, the token cache, the
outbox's ledger) into the page's values, purely; ``access.py`` decides who may act (session and
CSRF, purely); ``page.py`` renders the template; ``handlers.py`` is the thin HTTP edge.
"""
