"""The site policies an agent can run, by name: `greedy` (`site_agent.SitePolicy`), `marl` (the
shipped learned policy, `marl_site.MarlSitePolicy`) or `marl:PATH`. Above both, so the agent's
module never imports the learned policy's."""

from __future__ import annotations

from agents.site_agent import SitePolicy


def default_site_policy() -> str:
    """`marl` when the shipped learned policy is there, else `greedy`."""
    from pathlib import Path

    from agents.runtime import SHIPPED

    shipped = Path(__file__).resolve().parent / "policies" / SHIPPED
    return "marl" if shipped.exists() else "greedy"


def make_site_policy(name: str) -> SitePolicy:
    """`greedy`, `marl` (the shipped learned policy) or `marl:PATH` (a policy file)."""
    if name == "greedy":
        return SitePolicy()
    if name == "marl" or name.startswith("marl:"):
        from agents.marl_site import MarlSitePolicy

        path = name.partition(":")[2] or None
        try:
            return MarlSitePolicy(path)
        except (FileNotFoundError, OSError, ValueError, KeyError) as exc:
            raise ValueError(f"policy {name!r}: {exc}") from None
    raise ValueError(f"unknown site policy {name!r}; known: greedy, marl, marl:PATH")
