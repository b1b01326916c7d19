"""``python -m services.ingest``."""

from libs.common.grpc_server import run
from services.ingest.config import IngestSettings
from services.ingest.server import build_app

run("ingest", IngestSettings, build_app)
