# The listeners service (specification §3.1). Build: `docker build -t listeners-service .`
#
# The build stage installs the locked dependencies (wheels only, every hash checked) and the
# project's own wheel into /opt/venv; the final stage copies that venv onto a clean
# python:3.11-slim, so the image has no compiler, no build backend, no pip and no pip cache.
# tests/test_image.py builds this file as it is (scripts/image) and starts the image's CMD as its USER.

FROM python:3.11-slim AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_ROOT_USER_ACTION=ignore
WORKDIR /build
# Each venv first gets the pinned pip, then its lock with --no-deps: no resolver runs, so a newer
# release on the index changes nothing (scripts/bootstrap does the same).
COPY requirements-pip.lock requirements.lock deploy/build-requirements.lock ./
RUN python -m venv /opt/venv \
 && /opt/venv/bin/pip install --quiet --no-deps --require-hashes -r requirements-pip.lock \
 && /opt/venv/bin/pip install --quiet --no-deps --only-binary=:all: --require-hashes -r requirements.lock
RUN python -m venv /opt/build-tools \
 && /opt/build-tools/bin/pip install --quiet --no-deps --require-hashes -r requirements-pip.lock \
 && /opt/build-tools/bin/pip install --quiet --no-deps --only-binary=:all: --require-hashes -r build-requirements.lock
COPY pyproject.toml ./
COPY src ./src
COPY clients/python ./clients/python
# Two wheels: the service, and listeners-bridge (the contract and Redis layer it shares with
# its consumers, clients/python/), on which it depends.
RUN /opt/build-tools/bin/pip wheel --quiet --no-deps --no-build-isolation --wheel-dir dist . ./clients/python \
 && /opt/venv/bin/pip install --quiet --no-deps dist/listeners-*.whl dist/listeners_bridge-*.whl \
 && /opt/venv/bin/python -m pip uninstall --quiet --yes setuptools pip

FROM python:3.11-slim
# The base image's own pip, setuptools and wheel serve nothing at run time (the service runs
# from /opt/venv, which does not see them); removed so that image scans report only what runs.
# The user's group gets the same id as USER below (useradd --user-group alone would give it a
# system gid, 999, that the process never runs with).
RUN python -m pip uninstall --quiet --yes pip setuptools wheel \
 && groupadd --system --gid 10001 listeners \
 && useradd --system --uid 10001 --gid 10001 --no-create-home --shell /usr/sbin/nologin listeners
# On SIGTERM the service hands its users over at once, and the whole stop (uvicorn closing its
# connections, at most UVICORN_TIMEOUT_GRACEFUL_SHUTDOWN = 3 s of it, then closing the listeners
# and flushing Redis) is bounded by LISTENERS_SHUTDOWN_TIMEOUT_SECONDS (8 s) from the signal, a
# watchdog ending whatever overruns: well inside ECS's stopTimeout.
# UVICORN_WS: the WebSocket protocol made for 10,000 sockets per process (deliver.wsprotocol,
# docs/websocket.md "At scale"); uvicorn reads it as it reads --ws, the command is unchanged.
# UVICORN_HTTP: uvicorn's httptools protocol that refuses an upgrade before any WebSocket set-up
# and cuts a request head that does not arrive (deliver.httpprotocol, docs/security.md).
# WEB_CONCURRENCY (workers) is set by the task definition, one per vCPU.
# Bytecode: the venv's .pyc files, written by pip in the build stage, are kept (24 MB): the root
# filesystem is read-only in the task, so without them every worker would compile the venv again
# at every start (docs/deploy.md, "The image"); nothing else may write any.
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    UVICORN_TIMEOUT_GRACEFUL_SHUTDOWN=3 \
    UVICORN_WS=listeners.deliver.wsprotocol:DirectWebSocketProtocol \
    UVICORN_HTTP=listeners.deliver.httpprotocol:GuardedHttpProtocol
COPY --from=build /opt/venv /opt/venv
WORKDIR /app
COPY app ./app
USER 10001:10001
EXPOSE 8080
# Exec form: uvicorn is PID 1 and gets the SIGTERM itself (graceful stop as described above).
STOPSIGNAL SIGTERM
HEALTHCHECK --interval=15s --timeout=5s --start-period=30s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8080/healthz', timeout=4)"]
CMD ["uvicorn", "app.main:app", "--host", "0.0.0.0", "--port", "8080"]
