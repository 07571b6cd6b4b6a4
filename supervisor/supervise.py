"""One-for-one supervision of actors with a restart-intensity limit, as OTP supervisors do."""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Awaitable, Callable

import attrs
import trio

from aziot.bus.actor import Handler, serve_actor
from aziot.bus.bus import Bus
from aziot.bus.faults import Faults
from aziot.config.loader import ConfigError

log = logging.getLogger(__name__)


class RestartLimitExceeded(Exception):
    """An actor crashed more often than its policy allows; the daemon must exit."""


@attrs.frozen
class RestartPolicy:
    max_restarts: int = 5
    window: float = 60.0  # seconds
    backoff: float = 0.05  # seconds per recent crash, so a crash loop does not spin


async def supervise(
    bus: Bus,
    name: str,
    start: Callable[[], Awaitable[Handler]],
    faults: Faults,
    policy: RestartPolicy,
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run actor `name`, starting it again after a crash, until the limit or cancellation."""
    inbox = bus.open_mailbox(name)
    crashes: deque[float] = deque()
    started = False
    while True:
        try:
            handler = await start()
            if not started:
                task_status.started()
                started = True
            await serve_actor(bus, name, handler, inbox, faults)
            return
        except ConfigError:
            raise  # no restart mends a configuration: the daemon exits 78
        except Exception as error:  # a crash is a message: log it with its cause, restart
            now = trio.current_time()
            crashes.append(now)
            while crashes and crashes[0] < now - policy.window:
                crashes.popleft()
            cause = error.__cause__ or error
            if len(crashes) > policy.max_restarts:
                raise RestartLimitExceeded(
                    f"actor {name} crashed {len(crashes)} times within {policy.window:g} s "
                    f"(limit {policy.max_restarts}); last cause: {cause!r}"
                ) from error
            log.error(
                "actor %s crashed (%r); restarting (%d of %d allowed in %g s)",
                name,
                cause,
                len(crashes),
                policy.max_restarts,
                policy.window,
            )
            await trio.sleep(policy.backoff * len(crashes))
