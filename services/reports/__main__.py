"""``python -m services.reports``: the reports service."""

from libs.common.grpc_server import run
from services.reports.app import SERVICE_NAME, build_app
from services.reports.config import ReportsSettings

if __name__ == "__main__":
    run(SERVICE_NAME, ReportsSettings, build_app)
