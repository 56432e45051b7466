"""Scheduling policies behind one interface (`cncbrain.twin.view`): the baselines. The learned
policy and the warm-start teachers live in `agents`; `agents.catalog` resolves every policy name
(`greedy`, `marl`, `marl:PATH`, `teacher:NAME`, …)."""

from __future__ import annotations

from cncbrain.policies.baselines import BASELINES, Policy

__all__ = ["BASELINES", "Policy"]
