"""Running ``esp`` command lines in-process against a mesh, as the CLI tests do."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import pytest

from libs.client.cli import main


@dataclass(frozen=True)
class Run:
    """What one ``esp`` command line did."""

    code: int
    out: str
    err: str


Esp = Callable[..., Run]


def cli_runner(endpoint: str, api_key: str, monkeypatch: pytest.MonkeyPatch,
               capsys: pytest.CaptureFixture[str]) -> Esp:
    """``run("webhook", "list")`` runs ``esp webhook list`` against ``endpoint`` with ``api_key``."""
    monkeypatch.setenv("ESP_ENDPOINT", endpoint)
    monkeypatch.setenv("ESP_API_KEY", api_key)

    def run(*argv: str) -> Run:
        capsys.readouterr()
        with pytest.raises(SystemExit) as exited:
            main(list(argv))
        captured = capsys.readouterr()
        code = exited.value.code
        return Run(code if isinstance(code, int) else 1, captured.out, captured.err)

    return run
