"""The emails a scenario's day brings: when each is accepted, its class and its size, the same for a seed.

Single sends follow the diurnal curve (``Traffic.hourly_weights``) times any spikes, as a Poisson process
minute by minute; campaign bursts add bulk emails at their own pace. Sizes are lognormal per class, plus an
attachment for the share of emails that carry one; an email too large for every provider of the market carries
its attachments as download links, as ingest decides at accept (``attachments_as_links``), so only its body counts.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from libs.common.message_classes import MessageClass
from libs.providers.capabilities import provider_size_cap
from libs.routing.pacing import DemandProfile
from libs.routing_sim.scenario import Scenario, SizeModel, Traffic

__all__ = ["Arrival", "arrivals", "demand_profile", "draw_sizes", "rate_per_second"]

MINUTE_S = 60.0
HOUR_S = 3600.0


@dataclass(frozen=True)
class Arrival:
    """One email accepted during the day."""

    index: int
    at_s: float
    message_class: str
    size_bytes: int


def rate_per_second(traffic: Traffic, at_s: float) -> float:
    """Relative arrival intensity of single sends at ``at_s`` (the diurnal weight times any spike)."""
    hour = at_s / 3600
    weight = traffic.hourly_weights[min(23, int(hour))]
    for spike in traffic.spikes:
        if spike.start_h <= hour < spike.end_h:
            weight *= spike.factor
    return weight


def arrivals(scenario: Scenario) -> list[Arrival]:
    """Every email of the day in acceptance order (deterministic for the scenario's seed)."""
    rng = np.random.Generator(np.random.PCG64(scenario.seed))
    traffic = scenario.traffic
    minutes = int(scenario.day_s // MINUTE_S)
    weights = np.array([rate_per_second(traffic, (m + 0.5) * MINUTE_S) for m in range(minutes)])
    expected = traffic.emails * weights / weights.sum()
    counts = rng.poisson(expected)
    times: list[float] = []
    for minute, count in enumerate(counts):
        times.extend((minute * MINUTE_S + rng.random(count) * MINUTE_S).tolist())
    classes = [c.value for c in MessageClass]
    shares = np.array([traffic.mix.get(c, 0.0) for c in classes])
    picked = rng.choice(len(classes), size=len(times), p=shares / shares.sum())
    emails: list[tuple[float, str]] = [(t, classes[k]) for t, k in zip(times, picked, strict=True)]
    for burst in traffic.campaigns:
        start = burst.at_h * 3600
        emails.extend((min(scenario.day_s - 1e-3, start + i / burst.per_second), MessageClass.BULK.value)
                      for i in range(burst.recipients))
    emails.sort(key=lambda e: e[0])
    largest = max(provider_size_cap(p.type, p.max_message_bytes) for p in scenario.providers)
    sizes = {c: draw_sizes(rng, traffic.sizes[c], sum(1 for _, k in emails if k == c), largest) for c in classes}
    taken = dict.fromkeys(classes, 0)
    result = []
    for index, (at_s, message_class) in enumerate(emails):
        size = sizes[message_class][taken[message_class]]
        taken[message_class] += 1
        result.append(Arrival(index, at_s, message_class, size))
    return result


def demand_profile(scenario: Scenario) -> DemandProfile:
    """The day's expected sending an hour, as the platform team would configure it (``ESP_DEMAND_PROFILE``): the
    traffic model's expectation — the diurnal curve, the spikes and the scheduled campaigns, the seasonal shape
    and the marketing calendar known ahead — not the day's draw, and nothing of the market's events (outages,
    brown-outs), which nobody knows ahead."""
    traffic = scenario.traffic
    minutes = int(scenario.day_s // MINUTE_S)
    weights = np.array([rate_per_second(traffic, (m + 0.5) * MINUTE_S) for m in range(minutes)])
    hourly = np.zeros(24)
    np.add.at(hourly, np.minimum(23, np.arange(minutes) // 60), traffic.emails * weights / weights.sum())
    for burst in traffic.campaigns:
        offsets = np.arange(burst.recipients) / burst.per_second
        sent_at = np.minimum(scenario.day_s - 1e-3, burst.at_h * HOUR_S + offsets)
        np.add.at(hourly, np.minimum(23, (sent_at // HOUR_S).astype(int)), 1.0)
    return DemandProfile(tuple(float(v) for v in hourly))


def draw_sizes(rng: np.random.Generator, model: SizeModel, count: int, largest_cap: int) -> list[int]:
    """``count`` encoded sizes of one class's ``model``; above ``largest_cap`` (the largest provider cap of the market)
    an email carries its attachments as links, so only its body counts."""
    body = np.clip(rng.lognormal(np.log(model.median_bytes), model.sigma, count), 200, model.max_bytes)
    total = body
    if model.attachment_share > 0 and model.attachment_median_bytes > 0:
        carries = rng.random(count) < model.attachment_share
        attached = rng.lognormal(np.log(model.attachment_median_bytes), model.attachment_sigma, count)
        total = np.clip(body + np.where(carries, attached, 0.0), 200, model.max_bytes)
        total = np.where(total > largest_cap, body, total)  # attachments travel as links
    return [int(b) for b in total]
