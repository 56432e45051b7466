"""Test helper: a tenant and its token, made through governance's API."""

async def tenant_with_token(channels, operator: str, tenant: str, max_gpus: int):
    """Create `tenant` (as the operator) and issue it a token: (governance stub, operator metadata,
    IssueTokenResponse)."""
    from cnc.governance.v1 import governance_pb2 as gpb
    from cnc.governance.v1 import governance_pb2_grpc
    from cncbrain.auth import bearer_metadata

    gov = governance_pb2_grpc.GovernanceServiceStub(channels["governance"])
    md = bearer_metadata(operator)
    await gov.CreateTenant(gpb.CreateTenantRequest(tenant_id=tenant, quota=gpb.Quota(max_gpus=max_gpus)), metadata=md)
    issued = await gov.IssueToken(gpb.IssueTokenRequest(role=gpb.ROLE_TENANT, tenant_id=tenant), metadata=md)
    return gov, md, issued
