"""``python -m services.sender``."""

from libs.common.grpc_server import run
from services.sender.config import SenderSettings
from services.sender.server import build_app

run("sender", SenderSettings, build_app)
