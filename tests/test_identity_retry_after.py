"""The cloud client honours a 429's Retry-After (the original ignores it): never back before
the service asks, with up to 10% jitter; below the original's schedule, the schedule holds."""

from __future__ import annotations

import ssl

import httpx
import pytest

from aziot.actors.identity.cloud import CloudClient, retry_after


def client(answers: list[httpx.Response], sleeps: list[float]) -> CloudClient:
    def answer(request: httpx.Request) -> httpx.Response:
        return answers.pop(0)

    return CloudClient(
        ssl.create_default_context(),
        sleep=sleeps.append,
        random=lambda: 0.5,
        transport=httpx.MockTransport(answer),
    )


@pytest.mark.parametrize(
    ("header", "slept"),
    [
        ("120", 120 * 1.05),  # longer than the schedule's 60 + jitter: the service's wish
        ("5", 60 + 5),  # shorter: the original's schedule (60 s + up to 10 s, here half)
        (None, 60 + 5),
        ("soon", 60 + 5),  # unreadable: ignored
    ],
)
def test_retry_after(header: str | None, slept: float) -> None:
    headers = {"retry-after": header} if header is not None else {}
    answers = [httpx.Response(429, headers=headers), httpx.Response(200, json={})]
    sleeps: list[float] = []
    with client(answers, sleeps) as cloud:
        response = cloud.send("GET", "https://hub.example/x")
    assert response.status == 200
    assert sleeps == [pytest.approx(slept)]


def test_http_date_retry_after() -> None:
    assert retry_after("Wed, 21 Oct 2015 07:28:00 GMT", 1445412480.0 - 90) == pytest.approx(90)
    assert retry_after("Wed, 21 Oct 2015 07:28:00 GMT", 1445412480.0 + 10) == 0.0
    assert retry_after("999999", 0) == 3600.0
