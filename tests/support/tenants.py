"""Test helpers: a tenant and its token, made through governance's API; a one-site pool."""

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


async def enroll_a(channels, operator: str) -> None:
    """Enroll site `a` (8 H100 at $4): a brain with credentials counts enrolled sites only."""
    from cnc.governance.v1 import governance_pb2 as gpb
    from cnc.governance.v1 import governance_pb2_grpc
    from cncbrain.auth import bearer_metadata

    await governance_pb2_grpc.GovernanceServiceStub(channels["governance"]).EnrollSite(gpb.EnrollSiteRequest(
        site=gpb.SiteEnrollment(site_id="a", gpus=[gpb.EnrolledGpus(gpu_type="H100", max_count=8,
                                                                     price_usd_per_hour=4.0)])),
        metadata=bearer_metadata(operator))


async def one_site_pool(admin, channels, operator: str, scheduler) -> None:
    """Enroll site `a` and tell the scheduler (a running SchedulerServer) the pool is that site with
    8 H100 (a snapshot, as perception would send); return once the scheduler counts it up."""
    import asyncio

    from cnc.common.v1 import common_pb2 as common
    from cnc.perception.v1 import perception_pb2 as ppb
    from cncbrain.bus import subjects

    await enroll_a(channels, operator)
    snap = ppb.Snapshot(sequence=1)
    snap.sites.append(ppb.SiteStatus(site=common.Site(site_id="a", gpu_pools=[
        common.GpuPool(gpu_type="H100", count=8, hbm_gb=80, price_usd_per_hour=4.0)]), state=common.SITE_STATE_UP))
    await admin.publish(subjects.PERCEPTION_SNAPSHOT, snap)
    for _ in range(200):  # the scheduler reads the snapshot from its consumer: wait for it, however slow
        if "a" in scheduler.coordinator.inventory.up:
            return
        await asyncio.sleep(0.05)
    raise AssertionError("the scheduler never took site a as up from the snapshot")
