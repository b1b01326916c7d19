"""``python -m services.router``."""

from libs.common.grpc_server import run
from services.router.config import RouterSettings
from services.router.server import build_app

run("router", RouterSettings, build_app)
