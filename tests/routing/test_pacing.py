"""Daily quotas are paced against the day's expected shape of sending (``libs.routing.pacing.DemandProfile``), as the
health board reports it in ``ProviderHealth.day_share``; uniform, the default, is a straight line of the day."""

from __future__ import annotations

import pytest

from libs.routing.health import HealthBoard
from libs.routing.memory_redis import MemoryRedis
from libs.routing.pacing import DAY_S, UNIFORM, DemandProfile, PacingSettings
from tests.routing.conftest import FAST_BREAKER

MIDNIGHT = 1_700_000_000.0 - 1_700_000_000.0 % DAY_S
EVENING_PEAK = DemandProfile((1.0,) * 18 + (6.0,) * 4 + (1.0,) * 2)
"""One unit an hour, six from 18:00 to 22:00: 18 + 24 + 2 = 44 units."""


def test_a_uniform_profile_is_the_share_of_the_day_gone_by() -> None:
    for seconds in (0.0, 3600.0, 12 * 3600.0 + 900.0, 19 * 3600.0, DAY_S):
        assert UNIFORM.share_by(seconds) == pytest.approx(seconds / DAY_S)
    assert DemandProfile((2.0,) * 24).share_by(7 * 3600.0 + 1800.0) == pytest.approx(7.5 / 24)


def test_pacing_follows_the_demand_profile() -> None:
    assert EVENING_PEAK.share_by(18 * 3600.0) == pytest.approx(18 / 44)
    assert EVENING_PEAK.share_by(19 * 3600.0) == pytest.approx(24 / 44)
    assert EVENING_PEAK.share_by(18 * 3600.0 + 1800.0) == pytest.approx(21 / 44)  # linear within the hour
    assert EVENING_PEAK.share_by(22 * 3600.0) == pytest.approx(42 / 44)
    assert EVENING_PEAK.share_by(DAY_S) == pytest.approx(1.0)


@pytest.mark.parametrize("weights", [(), (1.0, -1.0), (0.0, 0.0), (float("nan"),)])
def test_a_malformed_demand_profile_is_refused(weights: tuple[float, ...]) -> None:
    with pytest.raises(ValueError, match="demand profile"):
        DemandProfile(weights)


def test_no_configured_demand_profile_is_the_straight_line() -> None:
    assert PacingSettings().demand() == UNIFORM
    assert PacingSettings(demand_profile=(1.0,) * 18 + (6.0,) * 4 + (1.0,) * 2).demand() == EVENING_PEAK


async def test_the_board_reports_the_day_share_of_its_demand_profile() -> None:
    now = [MIDNIGHT + 19 * 3600.0]
    paced = HealthBoard(MemoryRedis(lambda: now[0]), "sim", FAST_BREAKER, clock=lambda: now[0],
                        demand=EVENING_PEAK)
    straight = HealthBoard(MemoryRedis(lambda: now[0]), "sim", FAST_BREAKER, clock=lambda: now[0])

    assert (await paced.refresh(["p"]))["p"].day_share == pytest.approx(24 / 44)
    assert (await straight.refresh(["p"]))["p"].day_share == pytest.approx(19 / 24)
