"""The provider simulator: one process speaking Mailgun, SendGrid v3, SES v2 and Postmark over HTTP plus SMTP.

Use ``run_simulator`` inside an event loop (tests) or ``python -m dev.simulator`` (``make run``, benchmarks).
Personalities are named provider instances reached at ``<http_url>/p/<name>/…`` (HTTP) or by SMTP AUTH user;
their behaviour is steered at runtime through the admin API (``dev.simulator.app``, ``SimulatorClient``).

Exports are loaded lazily so that ``dev.simulator.signing`` can be imported without the server stack.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from dev.simulator.client import SimulatorClient
    from dev.simulator.model import Knobs, Personality, default_personalities, load_personalities
    from dev.simulator.runner import RunningSimulator, run_simulator

_EXPORTS = {
    "SimulatorClient": "dev.simulator.client",
    "Knobs": "dev.simulator.model",
    "Personality": "dev.simulator.model",
    "default_personalities": "dev.simulator.model",
    "load_personalities": "dev.simulator.model",
    "RunningSimulator": "dev.simulator.runner",
    "run_simulator": "dev.simulator.runner",
}

__all__ = [
    "Knobs",
    "Personality",
    "RunningSimulator",
    "SimulatorClient",
    "default_personalities",
    "load_personalities",
    "run_simulator",
]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'dev.simulator' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
