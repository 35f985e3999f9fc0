"""The hand-written proxy the gateway is compared with: what a developer writes in an afternoon.

Parse the JSON, rename ``qty``, inject the shop, wrap a flat body into Manager's envelope, forward
it with one shared session and the org key, answer with Manager's status and body. No validation,
no idempotency, no metrics. Plain: asyncio's loop, stdlib json, aiohttp's access log (to a file).
``--tuned``: uvloop, orjson, no access log.

    python bench/proxy.py --port 8081 --upstream URL --key ORG_KEY --shop SHOP [--tuned]
"""

from __future__ import annotations

import argparse
import json
import logging
from collections.abc import AsyncIterator, Callable
from typing import Any

import aiohttp
from aiohttp import web

SESSION = web.AppKey("session", aiohttp.ClientSession)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--upstream", required=True, help="Manager's order-requests URL (v1)")
    parser.add_argument("--key", required=True, help="the org key, sent as header apikey")
    parser.add_argument("--shop", required=True)
    parser.add_argument("--access-log", default="/dev/null", help="file for the access log")
    parser.add_argument("--tuned", action="store_true", help="uvloop, orjson, no access log")
    args = parser.parse_args()
    loads: Callable[[bytes], Any] = json.loads
    dumps: Callable[[Any], bytes] = lambda obj: json.dumps(obj).encode()  # noqa: E731
    if args.tuned:
        import orjson

        loads, dumps = orjson.loads, orjson.dumps
    headers = {"apikey": args.key, "Content-Type": "application/json"}

    async def order(request: web.Request) -> web.Response:
        body = loads(await request.read())
        payload = body.get("payload", body)
        for item in payload.get("items", []):
            if "qty" in item:
                item["quantity"] = item.pop("qty")
        payload["shop_id"] = args.shop
        if "payload" not in body:
            reference, source = payload.pop("external_reference", None), payload.pop("source", None)
            body = {"external_reference": reference, "source": source, "payload": payload}
        async with request.app[SESSION].post(args.upstream, data=dumps(body), headers=headers) as r:
            return web.Response(status=r.status, body=await r.read(), content_type=r.content_type)

    async def session(app: web.Application) -> AsyncIterator[None]:
        app[SESSION] = aiohttp.ClientSession()
        yield
        await app[SESSION].close()

    app = web.Application()
    app.router.add_post("/api/v1/external-order", order)
    app.cleanup_ctx.append(session)
    if args.tuned:
        import uvloop

        loop = uvloop.new_event_loop()
        web.run_app(app, host="127.0.0.1", port=args.port, access_log=None, loop=loop, print=None)
    else:
        logging.basicConfig(level=logging.INFO, filename=args.access_log)
        web.run_app(app, host="127.0.0.1", port=args.port, print=None)


if __name__ == "__main__":
    main()
