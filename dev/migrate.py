"""Apply every service's SQL migrations: ``python -m dev.migrate [DSN]`` (default: ESP_POSTGRES_DSN)."""

from __future__ import annotations

import asyncio
import os
import sys

from libs.common.db import migrate_services

SERVICES_WITH_SCHEMAS = ("ingest", "ledger", "router", "reports", "campaigns", "webhooks")


def main() -> None:
    dsn = sys.argv[1] if len(sys.argv) > 1 else os.environ.get("ESP_POSTGRES_DSN", "")
    if not dsn:
        sys.exit("usage: python -m dev.migrate DSN (or set ESP_POSTGRES_DSN)")
    applied = asyncio.run(migrate_services(dsn, SERVICES_WITH_SCHEMAS))
    for m in applied:
        print(f"applied {m.service} {m.version:03d} {m.name}")
    print(f"{len(applied)} migration(s) applied")


if __name__ == "__main__":
    main()
