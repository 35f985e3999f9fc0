"""A partner shape the gateway has never seen goes through with a profile alone (no code).

End to end: the gateway app in front of the sandbox, the profile written in the TOML file.
"""

from __future__ import annotations

from typing import Any

from aiohttp.test_utils import TestServer
from pytest_aiohttp import AiohttpClient, AiohttpServer

from gateway.app import Seams, create_app
from gateway.auth import hash_key
from gateway.config import parse_config
from gateway.observability import Metrics
from gateway.sandbox import DEMO_ORG_ID, DEMO_ORG_KEY, DEMO_SHOP_ID, SANDBOX_KEY, create_sandbox_app

KEY = "apotheken-partner-key-0123456789"

# A German-language telemedicine platform: nothing here is named like Manager's fields.
BESTELLUNG: dict[str, Any] = {
    "bestellung": {
        "nummer": "AP-77-0042",
        "kunde": {"vorname": "Erika", "nachname": "Musterfrau", "mail": "erika@example.com"},
        "positionen": [
            {"artikel": "Flos 18/1", "menge": "2", "pzn": "11111", "preis": "9.10"},
            {"artikel": "Extrakt 10", "menge": 1, "pzn": "22222"},
        ],
        "lieferung": {"strasse": "Beispielweg 3", "plz": "20095", "ort": "Hamburg"},
    },
    "rezept": {"link": "https://rezepte.example/ap/77-0042.pdf"},
    "notiz": "bitte klingeln",
}

PROFILE = """
[profiles.apotheke]
external_reference = "bestellung.nummer"
source = "'apotheke-partner'"
customer_name = "join(' ', [bestellung.kunde.vorname, bestellung.kunde.nachname])"
customer_email = "bestellung.kunde.mail"
address_street = "bestellung.lieferung.strasse"
address_zip = "bestellung.lieferung.plz"
address_city = "bestellung.lieferung.ort"
items = "bestellung.positionen[].{name: artikel, quantity: menge, p1_id: pzn, price: preis}"
prescription_pdf_url = "rezept.link"
keep_unmapped = true
"""


async def test_unknown_partner_shape_reaches_manager_through_its_profile(
    aiohttp_server: AiohttpServer, aiohttp_client: AiohttpClient
) -> None:
    sandbox: TestServer = await aiohttp_server(create_sandbox_app())
    config = parse_config(
        f"""
[server]
admin_port = 0

[manager]
base_url = "http://127.0.0.1:{sandbox.port}"

[shops.hamburg]
org_id = "{DEMO_ORG_ID}"
shop_id = "{DEMO_SHOP_ID}"
manager_key_env = "ORG_KEY"

[partners.apotheke]
shop = "hamburg"
key_sha256 = "{hash_key(KEY)}"
profile = "apotheke"
pdf = "forward"
{PROFILE}""",
        environ={"ORG_KEY": DEMO_ORG_KEY},
    )
    client = await aiohttp_client(create_app(config, Seams(metrics=Metrics())))

    response = await client.post("/api/v1/external-order", json=BESTELLUNG, headers={"apikey": KEY})

    assert response.status == 200, await response.text()
    [received] = sandbox.app[SANDBOX_KEY].received
    assert received["envelope"] == {
        "external_reference": "AP-77-0042",
        "source": "apotheke-partner",
        "payload": {
            "shop_id": DEMO_SHOP_ID,
            "customer_name": "Erika Musterfrau",
            "customer_email": "erika@example.com",
            "address_street": "Beispielweg 3",
            "address_zip": "20095",
            "address_city": "Hamburg",
            "items": [
                {"name": "Flos 18/1", "quantity": 2, "p1_id": "11111", "price": 9.1},
                {"name": "Extrakt 10", "quantity": 1, "p1_id": "22222"},  # no null price
            ],
            "prescription_pdf_url": "https://rezepte.example/ap/77-0042.pdf",
            "notiz": "bitte klingeln",  # keep_unmapped: the top-level field no expression reads
        },
    }
