"""``python -m services.campaigns``."""

from libs.common.grpc_server import run
from services.campaigns.config import CampaignsSettings
from services.campaigns.server import build_app

run("campaigns", CampaignsSettings, build_app)
