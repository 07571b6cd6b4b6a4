"""The baseline: a bare quart-trio handler on hypercorn that computes an HMAC, nothing else."""

from __future__ import annotations

import base64
import hashlib
import hmac

from quart import request
from quart_trio import QuartTrio

app = QuartTrio(__name__)
KEY = b"k" * 32


@app.post("/sign")
async def sign() -> dict[str, str]:
    body = await request.get_json(force=True)
    message = base64.b64decode(body["parameters"]["message"])
    return {"signature": base64.b64encode(hmac.new(KEY, message, hashlib.sha256).digest()).decode()}
