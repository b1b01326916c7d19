"""``python -m services.gateway``: serve the REST facade with uvicorn."""

from __future__ import annotations

import uvicorn

from libs.common.logging import configure_logging
from libs.common.telemetry import configure_tracing
from services.gateway.app import create_app
from services.gateway.config import load_config


def main() -> None:
    """Read the settings, build the app and serve it until SIGTERM/SIGINT."""
    config = load_config()
    configure_logging("gateway", config.log_level, config.log_format)
    configure_tracing("gateway", config.otel_exporter_otlp_endpoint)
    app = create_app(config.descriptor_set_path, config.ingest_addr, options=config.transcoder_options())
    uvicorn.run(app, host=config.gateway_host, port=config.gateway_port, log_config=None, access_log=False)


if __name__ == "__main__":
    main()
