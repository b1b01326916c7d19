"""The live progress bar of ``esp campaign status --watch``: on a terminal, rich's (a dependency of the mesh),
else tqdm's, else a plain line rewritten in place; into a pipe or a log, one plain line per change, so it stays
readable.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol, TextIO

from esp.v1 import campaigns_pb2

__all__ = [
    "ProgressView",
    "done_count",
    "open_view",
    "state_name",
    "summary",
]


def state_name(state: int) -> str:
    """``CAMPAIGN_STATE_RUNNING`` → ``running``."""
    return str(campaigns_pb2.CampaignState.Name(state)).removeprefix("CAMPAIGN_STATE_").lower()


def done_count(c: campaigns_pb2.Campaign) -> int:
    """Recipients no longer waiting: handed to a provider, failed, suppressed or cancelled."""
    p = c.progress
    return max(0, int(p.recipients - p.pending - p.queued))


def summary(c: campaigns_pb2.Campaign) -> str:
    """One line: the counts that move while a campaign sends, its rate and time left."""
    p = c.progress
    parts = [f"sent {p.sent}", f"delivered {p.delivered}", f"bounced {p.bounced}", f"failed {p.failed}",
             f"suppressed {p.suppressed}"]
    if p.cancelled:
        parts.append(f"cancelled {p.cancelled}")
    if p.send_rate:
        parts.append(f"{p.send_rate:.1f}/s")
    return ", ".join(parts)


class ProgressView(Protocol):
    """Shows a campaign's progress as it changes."""

    def update(self, campaign: campaigns_pb2.Campaign) -> None:
        """Show ``campaign`` as it is now."""

    def close(self) -> None:
        """Leave the last state on screen and release the terminal."""


class _RichView:
    def __init__(self, out: TextIO) -> None:
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskProgressColumn, TextColumn

        self._progress = Progress(TextColumn("{task.description:<10}"), BarColumn(), MofNCompleteColumn(),
                                  TaskProgressColumn(), TextColumn("{task.fields[detail]}"),
                                  console=Console(file=out), auto_refresh=False)
        self._progress.start()
        self._task = self._progress.add_task("", total=None, detail="")

    def update(self, campaign: campaigns_pb2.Campaign) -> None:
        self._progress.update(self._task, description=state_name(campaign.state),
                              total=campaign.progress.recipients or None, completed=done_count(campaign),
                              detail=summary(campaign), refresh=True)

    def close(self) -> None:
        self._progress.stop()


class _TqdmView:
    def __init__(self, out: TextIO) -> None:
        from tqdm import tqdm

        self._bar: Any = tqdm(total=0, unit="email", file=out, dynamic_ncols=True)

    def update(self, campaign: campaigns_pb2.Campaign) -> None:
        self._bar.total = campaign.progress.recipients
        self._bar.n = done_count(campaign)
        self._bar.set_description(state_name(campaign.state), refresh=False)
        self._bar.set_postfix_str(summary(campaign), refresh=False)
        self._bar.refresh()

    def close(self) -> None:
        self._bar.close()


class _PlainView:
    def __init__(self, out: TextIO) -> None:
        self._out = out
        self._tty = out.isatty()
        self._last = ""

    def update(self, campaign: campaigns_pb2.Campaign) -> None:
        total, done = campaign.progress.recipients, done_count(campaign)
        percent = f" {100 * done // total:3d}%" if total else ""
        line = f"{state_name(campaign.state):<10}{percent} {done}/{total}  {summary(campaign)}"
        if line == self._last:
            return
        if self._tty:
            self._out.write("\r" + line.ljust(len(self._last)))
        else:
            self._out.write(line + "\n")
        self._out.flush()
        self._last = line

    def close(self) -> None:
        if self._tty and self._last:
            self._out.write("\n")
            self._out.flush()


def open_view(out: TextIO) -> ProgressView:
    """The best view this installation can show on ``out``: a bar on a terminal, lines elsewhere."""
    if not out.isatty():
        return _PlainView(out)
    makers: list[Callable[[TextIO], ProgressView]] = [_RichView, _TqdmView]
    for make in makers:
        try:
            return make(out)
        except ImportError:
            continue
    return _PlainView(out)
