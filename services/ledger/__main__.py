"""``python -m services.ledger``."""

from libs.common.grpc_server import run
from services.ledger.config import LedgerSettings
from services.ledger.server import build_app

run("ledger", LedgerSettings, build_app)
