"""The container's entry point: `uvicorn app.main:app --host 0.0.0.0 --port 8080`.

Configuration is read and validated at import, so a broken configuration stops the
process before it listens, with one message naming every problem and exit status 2. Under
uvicorn's workers (`WEB_CONCURRENCY`), a worker exits with uvicorn's own STARTUP_FAILURE (3)
instead: the supervisor restarts any other dead worker, for ever, but stops on that one, so
the task stops (with status 0, uvicorn's supervisor's) instead of looping.
"""

from __future__ import annotations

import logging
import multiprocessing

from uvicorn.config import STARTUP_FAILURE

from listeners import logs
from listeners.assemble import create_app
from listeners.config import ConfigError, Settings, load_settings


def _settings() -> Settings:
    try:
        settings = load_settings()
    except ConfigError as exc:
        logs.configure()
        logging.getLogger("listeners").error(str(exc), extra={"problems": exc.problems})
        in_worker = multiprocessing.parent_process() is not None  # uvicorn's workers are spawned
        raise SystemExit(STARTUP_FAILURE if in_worker else 2) from None
    logs.configure(settings.log_level)
    secrets = (
        settings.redis.password,
        settings.redis.control_token,
        settings.firebase.admin_json,
        settings.websocket.admin_token,
        settings.google_credentials_json,  # the ECS task's Google key
    )
    for secret in secrets:
        if secret is not None:
            logs.register_secret(secret.reveal())
    return settings


app = create_app(_settings())
