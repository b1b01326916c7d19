"""The short chaos run CI guards: a sender killed mid-delivery, Redis restarted under load, and a provider that
takes emails without answering in time — each checked by the history checker (``make chaos`` runs them all)."""

from __future__ import annotations

import pytest

from dev.chaos.faults import SHORT_MATRIX
from dev.chaos.matrix import RunSettings, run_matrix, table

pytestmark = pytest.mark.e2e


async def test_the_short_fault_matrix_loses_nothing_and_charges_nothing_twice():
    result = await run_matrix(SHORT_MATRIX, RunSettings(rate=20, duration_s=8), baseline=False)

    violations = [f"{v.phase}: {violation}" for v in result.verdicts for violation in v.violations]
    assert not violations, f"{table(result.verdicts)}\n" + "\n".join(violations[:40])
    assert [v.phase.split("-", 1)[1] for v in result.verdicts] == ["+".join(p) for p in SHORT_MATRIX]
    assert all(v.accepted > 0 and v.lost == 0 and v.double_charges == 0 for v in result.verdicts)
