"""``python -m services.webhooks``."""

from libs.common.grpc_server import run
from services.webhooks.config import WebhooksSettings
from services.webhooks.server import build_app

run("webhooks", WebhooksSettings, build_app)
