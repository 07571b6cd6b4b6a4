"""The api-versions the checks speak and how ids go into a URL, as the original's clients."""

from __future__ import annotations

from urllib.parse import quote

KEYD_API = "2021-05-01"
CERTD_API = "2020-09-01"
# Characters the original's clients leave as they are in a key or cert id (spec/api.md §3.5).
_ID_SAFE = "/%!$&'()*+,;=:@-._~"


def quote_id(item_id: str) -> str:
    return quote(item_id, safe=_ID_SAFE)
