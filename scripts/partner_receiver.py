"""A telemedicine partner's callback endpoint, for `make demo`: verifies each status callback with
the `standardwebhooks` library (as a partner would) and prints it.

    PARTNER_CALLBACK_SECRET=whsec_... python scripts/partner_receiver.py --port 8070

Listens on 127.0.0.1 only; answers 204 to a verified message and 400 to anything else.
"""

from __future__ import annotations

import argparse
import os
import sys

from aiohttp import web
from standardwebhooks import Webhook
from standardwebhooks.webhooks import WebhookVerificationError

SECRET_ENV = "PARTNER_CALLBACK_SECRET"


def describe(message: dict[str, object], webhook_id: str) -> str:
    data = message.get("data")
    fields = data if isinstance(data, dict) else {}
    parts = [f"{key}={fields.get(key)}" for key in ("status", "manager_status", "event")]
    return (
        f"partner: {message.get('type')} {fields.get('external_reference')} {' '.join(parts)} "
        f"(webhook-id {webhook_id}, signature verified)"
    )


def create_app(secret: str) -> web.Application:
    webhook = Webhook(secret)

    async def receive(request: web.Request) -> web.Response:
        body = await request.read()
        try:
            message = webhook.verify(body, dict(request.headers))
        except (WebhookVerificationError, ValueError) as exc:
            print(f"partner: refused a callback: {exc}", flush=True)
            return web.Response(status=400)
        print(describe(message, request.headers.get("webhook-id", "?")), flush=True)
        return web.Response(status=204)

    app = web.Application()
    app.router.add_post("/callbacks", receive)
    return app


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=8070)
    args = parser.parse_args()
    secret = os.environ.get(SECRET_ENV, "")
    if not secret:
        print(f"partner_receiver: set {SECRET_ENV} (a whsec_ secret)", file=sys.stderr)
        return 2
    print(f"partner: receiving callbacks on http://127.0.0.1:{args.port}/callbacks", flush=True)
    web.run_app(create_app(secret), host="127.0.0.1", port=args.port, print=None)
    return 0


if __name__ == "__main__":
    sys.exit(main())
