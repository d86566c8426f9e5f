"""The service as the container runs it, but with its control listener dying each time it
starts (an injected fault), for the test that such a process exits non-zero:
`uvicorn tests.faulty_app:app`."""

from __future__ import annotations

from listeners.control import ControlListener


async def _dies(self: ControlListener) -> None:
    raise RuntimeError("injected fault")


ControlListener.run = _dies  # type: ignore[method-assign]

from app.main import app  # noqa: E402 - the fault is in place before the service is built

__all__ = ["app"]
