"""identityd under load (spec/lessons.md rows 8 and 9): many modules asking for their identity
at once (iotedge #7395), a hub throttling with a long Retry-After, and bursts of config writes
(IIS #665). A real aziotd (keyd + identityd) against mockcloud's hub, requests sent as real uids.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from aziot.actors.identity.actor import CONFIG_POLL, CONFIG_SETTLE, HUB_FRESH
from mockcloud.cloud import Cloud
from tests.daemon import Daemon
from tests.test_identityd_api import (
    HUB_ERROR,
    backup_dir,
    backup_name,
    call,
    generation,
    hub_calls,
    hub_delete_module,
    hub_put_module,
    principal,
    start_manual,
)

FIRST_UID = 5100
RELOADED = "reloaded identityd's settings and principals"


@pytest.fixture
def cloud(world_dir: Path) -> Iterator[Cloud]:
    with Cloud(world_dir / "cloud") as cloud:
        yield cloud


def module_principals(names: dict[int, str]) -> str:
    return "".join(principal(uid, name, ["module"]) for uid, name in names.items())


def poll_own_module(daemon: Daemon, uid: int, name: str, until: float) -> list[tuple[int, str]]:
    """`uid` asks for its module identity in a loop until `until`: (status, moduleId) each."""
    seen = []
    while time.monotonic() < until:
        status, body = call(daemon, uid, "GET", f"/identities/modules/{name}?type=aziot")
        seen.append((status, body.get("spec", {}).get("moduleId") if status == 200 else body))
    return seen


def poll_all(daemon: Daemon, names: dict[int, str], seconds: float) -> dict[int, list]:
    until = time.monotonic() + seconds
    with ThreadPoolExecutor(len(names)) as pool:
        futures = {
            uid: pool.submit(poll_own_module, daemon, uid, name, until)
            for uid, name in names.items()
        }
        return {uid: future.result() for uid, future in futures.items()}


def module_gets(cloud: Cloud, device: str) -> dict[str, int]:
    """Hub GETs of each module of `device` seen so far, by module id."""
    prefix = f"/devices/{device}/modules/"
    counts: dict[str, int] = {}
    for request in cloud.hub.requests:
        if request.method == "GET" and request.path.startswith(prefix):
            module = request.path[len(prefix) :]
            counts[module] = counts.get(module, 0) + 1
    return counts


def test_many_modules_asking_at_once_share_few_hub_requests(world_dir: Path, cloud: Cloud) -> None:
    device = "busy-dev"
    names = {FIRST_UID + i: f"mod{i:02d}" for i in range(20)}
    daemon, _ = start_manual(world_dir, cloud, device, module_principals(names))
    try:
        assert all(generation(cloud, device, name) for name in names.values())
        cloud.hub.clear_requests()
        seconds = 4.0
        results = poll_all(daemon, names, seconds)
        for uid, seen in results.items():
            assert seen, uid
            assert all(answer == (200, names[uid]) for answer in seen), (uid, seen[:3])
        total = sum(len(seen) for seen in results.values())
        assert total >= 3 * len(names), total  # the callers really did ask repeatedly
        gets = module_gets(cloud, device)
        # Each module: at most one hub GET per HUB_FRESH window, however often it is asked.
        most = math.ceil(seconds / HUB_FRESH) + 1
        assert set(gets) <= set(names.values()), gets
        assert all(count <= most for count in gets.values()), gets
        assert sum(gets.values()) <= len(names) * most
        assert all(r.status == 200 for r in cloud.hub.requests), [
            (r.path, r.status) for r in cloud.hub.requests if r.status != 200
        ]
    finally:
        daemon.stop()


def test_a_throttling_hub_is_not_hammered_and_backups_answer(world_dir: Path, cloud: Cloud) -> None:
    device = "throttled-dev"
    names = {FIRST_UID + i: f"thr{i}" for i in range(5)}
    daemon, key = start_manual(world_dir, cloud, device, module_principals(names))
    try:
        backups = backup_dir(daemon, cloud.hub_hostname, device)
        first = {name: generation(cloud, device, name) for name in names.values()}
        for name, gen in first.items():
            assert gen and gen in (backups / backup_name(name)).read_text()
        # Remade behind identityd's back, so what answers (hub or backup) can be told apart.
        hub_delete_module(cloud, device, key, "thr0")
        remade = hub_put_module(cloud, device, key, "thr0")

        window = 8  # the hub's Retry-After, seconds: longer than HUB_FRESH
        cloud.hub.misbehave("throttle", seconds=window)
        cloud.hub.clear_requests()
        started = time.monotonic()
        results = poll_all(daemon, names, 4.0)
        for uid, seen in results.items():
            assert seen and all(answer == (200, names[uid]) for answer in seen), (uid, seen[:3])
        # Backups answered, at once: no caller waited out the throttle.
        assert time.monotonic() - started < 4.0 + 2.0
        status, body = call(daemon, 0, "GET", "/identities/modules/thr0?type=aziot")
        assert status == 200 and body["spec"]["genId"] == first["thr0"] != remade
        # No hammering: only the reads already under way when the first 429 came asked; after
        # it no module read asks the hub until Retry-After has passed (each module asked dozens
        # of times, the hub saw at most one GET per module).
        throttled = [r for r in cloud.hub.requests if r.status == 429]
        assert len(cloud.hub.requests) == len(throttled) >= 1
        assert all(count == 1 for count in module_gets(cloud, device).values())
        assert sum(len(seen) for seen in results.values()) >= 5 * len(names)
        # A module with no backup gets the hub's error at once, not a throttled wait.
        asked = time.monotonic()
        status, body = call(daemon, 0, "GET", "/identities/modules/ghost?type=aziot")
        assert status == 404 and body["message"].startswith(HUB_ERROR), body
        assert time.monotonic() - asked < 2.0
        assert "throttled" in body["message"].lower(), body
        assert len(cloud.hub.requests) == len(throttled)

        # The hub recovers; after Retry-After the hub is asked again and its answer served.
        cloud.hub.behave()
        deadline = started + window * 1.1 + 4.0
        while time.monotonic() < deadline:
            status, body = call(daemon, 0, "GET", "/identities/modules/thr0?type=aziot")
            assert status == 200, body
            if body["spec"]["genId"] == remade:
                break
            time.sleep(0.5)
        assert body["spec"]["genId"] == remade
        assert time.monotonic() - started >= window  # not before the hub said
        assert hub_calls(cloud, "GET", device, "thr0") >= 1
        assert remade in (backups / backup_name("thr0")).read_text()
        assert "throttled" in daemon.logs()
    finally:
        daemon.stop()


def test_a_throttle_without_a_wait_still_leaves_the_hub_alone_a_while(
    world_dir: Path, cloud: Cloud
) -> None:
    """`Retry-After: 0` must not turn every read into a 429 (a loop against the hub): module
    reads still wait `HUB_FRESH` s before they ask again."""
    device = "zero-dev"
    names = {FIRST_UID + i: f"zero{i}" for i in range(3)}
    daemon, _ = start_manual(world_dir, cloud, device, module_principals(names))
    try:
        cloud.hub.misbehave("throttle", seconds=0)
        cloud.hub.clear_requests()
        results = poll_all(daemon, names, HUB_FRESH - 1.5)
        for uid, seen in results.items():
            assert len(seen) >= 3 and all(a == (200, names[uid]) for a in seen), (uid, seen[:3])
        assert all(r.status == 429 for r in cloud.hub.requests)
        assert all(count == 1 for count in module_gets(cloud, device).values())
        cloud.hub.behave()
        time.sleep(2.0)  # past HUB_FRESH since the 429s: each module asks the hub once more
        assert poll_all(daemon, names, 1.0)
        assert sorted(module_gets(cloud, device).values()) == [2, 2, 2]
        assert [r.status for r in cloud.hub.requests][-3:] == [200, 200, 200]
    finally:
        daemon.stop()


def count_reloads(daemon: Daemon) -> int:
    return daemon.logs().count(RELOADED)


def wait_for(predicate, seconds: float) -> bool:  # noqa: ANN001
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.2)
    return predicate()


def test_a_config_burst_gives_one_reload_and_no_loop(world_dir: Path, cloud: Cloud) -> None:
    device = "burst-dev"
    daemon, _ = start_manual(world_dir, cloud, device)
    try:
        config_dir = daemon.services["identityd"].config_dir
        assert count_reloads(daemon) == 0
        cloud.hub.clear_requests()
        # Ten writes within a second, each naming a different module principal: only the last
        # may ever reach the hub.
        burst = config_dir / "50-burst.toml"
        for i in range(10):
            burst.write_text(principal(FIRST_UID + i, f"burst{i}", ["module"]))
            time.sleep(0.09)
        settle = CONFIG_POLL + 2 * CONFIG_SETTLE + 2 * CONFIG_POLL
        assert wait_for(lambda: generation(cloud, device, "burst9") is not None, settle + 5)
        assert wait_for(lambda: count_reloads(daemon) >= 1, 5)
        reloaded_at = time.monotonic()
        assert all(generation(cloud, device, f"burst{i}") is None for i in range(9))
        puts = {r.path for r in cloud.hub.requests if r.method == "PUT"}
        assert puts == {f"/devices/{device}/modules/burst9"}, puts

        # Nothing identityd writes makes it reload itself: 10 s more, still one reload.
        time.sleep(max(0.0, 10.0 - (time.monotonic() - reloaded_at)))
        assert count_reloads(daemon) == 1, daemon.logs()[-3000:]
        assert daemon.logs().count("the config files changed; reloading") == 1
        status, body = call(daemon, FIRST_UID + 9, "GET", "/identities/modules/burst9?type=aziot")
        assert status == 200 and body["spec"]["moduleId"] == "burst9", body
        assert call(daemon, FIRST_UID, "GET", "/identities/modules/burst0?type=aziot")[0] == 401
    finally:
        daemon.stop()
