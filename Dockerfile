# sync-agent in a container: `agent run` as an unprivileged user, the config and the ledger on a volume.
#
#   docker build -t sync-agent .
#   docker run -d --name sync-agent -v sync-agent:/data -e VIEW_PASSWORD -e CRM_TOKEN \
#     --stop-timeout 60 sync-agent
#
# Put agent.toml in the volume (/data/agent.toml); relative paths in it (the
# ledger "var/agent.db", an outbox, a Maildir) are relative to it, so they land
# in the volume too. Secrets stay in the environment: write "${CRM_TOKEN}" in
# the file, never the token itself.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /opt/sync-agent
COPY pyproject.toml README.md ./
COPY agent ./agent
COPY durations ./durations
COPY sources ./sources
COPY sinks ./sinks
COPY state ./state
RUN python3 -m venv .venv && .venv/bin/pip install -q -e .
# Bytecode now, once: PYTHONDONTWRITEBYTECODE above keeps it from being written at run time, and without it every
# `agent status` of the HEALTHCHECK would compile the agent's modules from source again (about 35 ms each time).
RUN .venv/bin/python -m compileall -q agent durations sources sinks state

# An unprivileged user of its own; the volume belongs to it (a bind-mounted folder must be writable by uid 10001).
RUN useradd --system --uid 10001 --user-group --home-dir /data --no-create-home --shell /usr/sbin/nologin agent \
    && mkdir -p /data && chown agent:agent /data
USER 10001:10001
ENV PATH=/opt/sync-agent/.venv/bin:$PATH \
    AGENT_CONFIG=/data/agent.toml
WORKDIR /data
VOLUME ["/data"]

# `agent status` exits 1 when a source is stale, work is dead or paused, or a connector has been unreachable too long.
# With `[agent] listen = "0.0.0.0:8787"` in agent.toml (and `-p 8787:8787`), GET /healthz gives the same answer over
# HTTP without starting a process: point an orchestrator's probe at it instead.
HEALTHCHECK --interval=1m --timeout=30s --start-period=1m --retries=3 CMD ["agent", "status"]

# SIGTERM (docker stop) finishes the steps in flight and exits 0: give it longer than the slowest `timeout` of
# agent.toml plus the agent's 5 s stop grace (`--stop-timeout 60`; Docker's default is 10 s).
STOPSIGNAL SIGTERM
CMD ["agent", "run"]
