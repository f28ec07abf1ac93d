# piapi-flux-mcp over streamable HTTP, as a non-root user, with no secret in the image.
#
#   docker build -t piapi-flux-mcp .
#   docker run --rm -p 127.0.0.1:8000:8000 -e PIAPI_API_KEY -e FLUX_MCP_AUTH_TOKEN \
#       -v piapi-flux-data:/data piapi-flux-mcp
#
# Clients connect to http://127.0.0.1:8000/mcp with `Authorization: Bearer $FLUX_MCP_AUTH_TOKEN`.
# The container refuses to start without FLUX_MCP_AUTH_TOKEN: it listens beyond loopback, where
# every request must carry the token. Reached under a name other than localhost, also pass
# -e FLUX_MCP_ALLOWED_HOSTS=that.name. Add FLUX_MCP_SIMULATE=true to try it with no PiAPI key.
FROM python:3.12-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    FLUX_MCP_OUTPUT_DIR=/data/images \
    FLUX_MCP_DATA_DIR=/data/state

WORKDIR /src
COPY pyproject.toml README.md LICENSE ./
COPY flux_mcp ./flux_mcp
RUN pip install . && rm -rf /src \
    && useradd --create-home --uid 10001 --user-group flux \
    && mkdir -p /data && chown flux:flux /data

USER flux
WORKDIR /home/flux
VOLUME ["/data"]
EXPOSE 8000

# The server itself refuses to listen beyond loopback without the token; this check makes the
# container stop at once with one line, before anything starts.
ENTRYPOINT ["/bin/sh", "-c", "[ -n \"$FLUX_MCP_AUTH_TOKEN\" ] || { echo 'piapi-flux-mcp: set FLUX_MCP_AUTH_TOKEN (the bearer token HTTP clients must send)' >&2; exit 2; }; exec piapi-flux-mcp serve --transport http --host 0.0.0.0 --port 8000 \"$@\"", "piapi-flux-mcp"]
