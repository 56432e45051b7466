"""Governance domain (pure): tenants, tokens, quotas, placement policy, usage and the ledger chain.

Imports neither gRPC nor NATS; tested in `tests/unit/test_governance_*.py`.
"""
