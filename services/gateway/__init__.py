"""The REST facade: HTTP/JSON transcoded to gRPC from the contracts' ``google.api.http`` annotations."""

from services.gateway.app import create_app
from services.gateway.config import GatewayConfig, load_config
from services.gateway.openapi import build_openapi
from services.gateway.transcoder import Transcoder, TranscoderOptions

__all__ = ["GatewayConfig", "Transcoder", "TranscoderOptions", "build_openapi", "create_app", "load_config"]
