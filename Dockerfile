# ESP mesh: one image runs every service; `esp-service NAME` picks which (campaigns, gateway, ingest, ledger,
# migrate, reports, router, sender, webhooks). `make image` builds it (scripts/image.sh, with buildah); any OCI
# builder with BuildKit-style secret mounts builds it too:
#   docker build -t ghcr.io/esp-mesh/esp:0.1.0 .
# What is in it, and why: docs/DEPLOYMENT.md, "The image".

# Debian 12 and its Python 3.11. `make image` passes a base it debootstrapped from Debian's packages instead; any
# Debian bookworm base with apt does.
ARG BASE=docker.io/library/debian:bookworm-slim

# Build stage: the virtualenv and the generated code, made by scripts/image-install.sh (buf and grpc_tools live in a
# tools virtualenv there and stay in this stage).
FROM ${BASE} AS build
ENV DEBIAN_FRONTEND=noninteractive
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv ca-certificates \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY pyproject.toml buf.yaml ./
COPY proto proto
COPY third_party third_party
COPY libs libs
COPY services services
COPY dev dev
COPY scripts/image-install.sh scripts/esp-service scripts/
# The secret pip-ca, when given, is a CA bundle pip trusts (a builder behind a TLS-intercepting proxy); it is
# mounted for this step only and never stored in a layer.
RUN --mount=type=secret,id=pip-ca sh scripts/image-install.sh /src /opt/esp

# Final stage: Debian's Python, the virtualenv and the generated code; no compiler, no buf, no pip, no dev extras.
FROM ${BASE}
ENV DEBIAN_FRONTEND=noninteractive
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 ca-certificates \
    && rm -rf /var/lib/apt/lists/* /var/cache/apt/*.bin /var/log/apt /var/log/dpkg.log \
    && groupadd --gid 10001 esp \
    && useradd --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin esp
COPY --from=build /opt/esp /opt/esp
# Bytecode was compiled at build time and the root file system is read-only at run time: never write .pyc files.
# HOME is /tmp, the one writable place (an emptyDir in the manifests), for any library that wants a cache.
ENV PATH=/opt/esp/venv/bin:/opt/esp/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    HOME=/tmp \
    ESP_DESCRIPTOR_SET=/opt/esp/gen/esp.binpb
WORKDIR /opt/esp
# Numeric, so the kubelet can check runAsNonRoot without reading /etc/passwd.
USER 10001:10001
# No HEALTHCHECK: Kubernetes probes the services with native gRPC probes (the gateway with TCP).
ENTRYPOINT ["esp-service"]
