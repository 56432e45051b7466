"""AdaptationService: proto <-> domain. Refusals are raised (`cncbrain.errors`); the server's
error interceptor answers their status."""

from __future__ import annotations

import grpc

from cnc.adaptation.v1 import adaptation_pb2 as apb
from cnc.adaptation.v1 import adaptation_pb2_grpc
from cnc.common.v1 import common_pb2 as common
from cncbrain.auth import current_principal
from cncbrain.errors import FailedPrecondition, InvalidArgument, NotFound
from cncbrain.identity import PermissionDenied, require_tenant_access
from cncbrain.workload import tenant_of
from services.adaptation.domain.parallelism import (
    DEFAULT_BATCH_TOKENS,
    DEFAULT_SEQ_LEN,
    GpuGroup,
    LinkSpec,
    PlanError,
    plan_inference,
    plan_training,
    resolve_model,
)
from services.adaptation.events import Adapter, policy_from_pb, policy_to_pb

SERVICE = "/cnc.adaptation.v1.AdaptationService/"
OPERATOR_ONLY = frozenset({SERVICE + "TriggerRebalance"})
COST_MODEL = "cncbrain.twin.costmodel (docs/cost-model.md)"


def plan_on(request: apb.PlanParallelismRequest, model, groups: list[GpuGroup],
            links: dict[tuple[str, str], LinkSpec]) -> apb.PlanParallelismResponse:
    """The planner for `request` on explicit GPU groups and links — the service fills them from the
    pool when the request names none; `cncbrain plan --local` passes the request's. Raises PlanError."""
    top = max(1, min(request.top or 1, 20))
    if request.kind == apb.PLAN_KIND_TRAINING:
        plans = plan_training(model, groups, links, global_batch_tokens=request.global_batch_tokens or DEFAULT_BATCH_TOKENS,
                              seq_len=request.seq_len or DEFAULT_SEQ_LEN, top=top)
        return apb.PlanParallelismResponse(training=[training_to_pb(p) for p in plans], cost_model=COST_MODEL)
    slo = request.slo if request.HasField("slo") else None
    options = plan_inference(
        model, groups, context_tokens=request.context_tokens or 2048, prompt_tokens=request.prompt_tokens or 1024,
        ttft_slo_s=slo.ttft_ms / 1e3 if slo and slo.ttft_ms else None,
        tpot_slo_s=slo.tpot_ms / 1e3 if slo and slo.tpot_ms else None,
        allow_lower_precision=not request.bf16_only)
    return apb.PlanParallelismResponse(inference=[inference_to_pb(p) for p in options[:top]], cost_model=COST_MODEL)


def training_to_pb(p) -> apb.TrainingPlan:
    return apb.TrainingPlan(
        tensor_parallel=p.tp, pipeline_parallel=p.pp, data_parallel=p.dp, micro_batch_size=p.micro_batch,
        micro_batches=p.micro_batches, zero1=p.zero1, precision=p.precision, layout=p.layout,
        gpus_used=p.gpus_used, gpus=[apb.GpuGroup(site_id=s, count=n) for s, n in sorted(p.gpus_by_site.items())],
        tokens_per_s=p.tokens_per_s, step_s=p.step_s, compute_s=p.compute_s, bubble_fraction=p.bubble_fraction,
        allreduce_s=p.allreduce_s, wan_activation_s=p.wan_activation_s, memory_per_gpu_gb=p.memory_per_gpu_gb,
        memory_limit_gb=p.memory_limit_gb, mfu=p.mfu, notes=list(p.notes))


def inference_to_pb(p) -> apb.InferencePlan:
    return apb.InferencePlan(
        site_id=p.site_id, gpu_type=p.gpu_type, tensor_parallel=p.tp, pipeline_parallel=p.pp,
        precision=p.precision, gpus_per_replica=p.gpus_per_replica, replicas=p.replicas, max_batch=p.max_batch,
        tokens_per_s_per_replica=p.tokens_per_s_per_replica, tokens_per_s=p.tokens_per_s, ttft_s=p.ttft_s,
        tpot_s=p.tpot_s, weights_gb=p.weights_gb, reason=p.reason, notes=list(p.notes))


class AdaptationServicer(adaptation_pb2_grpc.AdaptationServiceServicer):
    def __init__(self, adapter: Adapter) -> None:
        self.ad = adapter

    def _owner_check(self, workload_id: str) -> None:
        w = self.ad.workloads.get(workload_id)
        tenant = tenant_of(w) if w is not None else ""
        if tenant:
            require_tenant_access(current_principal(), tenant)
        elif not current_principal().is_operator and w is not None:
            raise PermissionDenied(f"workload {workload_id} belongs to no tenant; only an operator may touch it")

    async def ListActions(self, request: apb.ListActionsRequest, context) -> apb.ListActionsResponse:
        principal = current_principal()
        if request.workload_id:
            self._owner_check(request.workload_id)
        actions = self.ad.list_actions(
            request.workload_id, request.site_id,
            request.since.ToNanoseconds() if request.HasField("since") else 0,
            request.until.ToNanoseconds() if request.HasField("until") else 0,
            min(request.limit or 100, 10_000) * (1 if principal.is_operator else 4))
        if not principal.is_operator:  # a tenant sees the actions on its own workloads
            workloads = self.ad.workloads
            actions = [a for a in actions
                       if (w := workloads.get(a.workload_id)) is not None and tenant_of(w) == principal.tenant_id]
        return apb.ListActionsResponse(actions=actions[: request.limit or 100])

    async def GetAutoscalingPolicy(self, request, context) -> apb.GetAutoscalingPolicyResponse:
        if not request.workload_id:
            raise InvalidArgument("workload_id: required")
        self._owner_check(request.workload_id)
        policy, explicit = self.ad.get_policy(request.workload_id)
        return apb.GetAutoscalingPolicyResponse(policy=policy_to_pb(policy), explicit=explicit)

    async def SetAutoscalingPolicy(self, request: apb.SetAutoscalingPolicyRequest,
                                   context: grpc.aio.ServicerContext) -> apb.SetAutoscalingPolicyResponse:
        if not request.workload_id:
            raise InvalidArgument("workload_id: required")
        w = self.ad.workloads.get(request.workload_id)
        if w is None:
            raise NotFound(f"no workload {request.workload_id!r}")
        if w.kind != common.WORKLOAD_KIND_INFERENCE_SERVICE:
            raise FailedPrecondition("only inference services scale")
        self._owner_check(request.workload_id)
        try:
            policy = policy_from_pb(request.policy)
        except ValueError as exc:  # the policy's own checks (AutoscalingPolicy)
            raise InvalidArgument(f"policy: {exc}") from None
        await self.ad.set_policy(request.workload_id, policy)
        return apb.SetAutoscalingPolicyResponse(policy=policy_to_pb(policy))

    async def PlanParallelism(self, request: apb.PlanParallelismRequest, context) -> apb.PlanParallelismResponse:
        if request.kind not in (apb.PLAN_KIND_TRAINING, apb.PLAN_KIND_INFERENCE):
            raise InvalidArgument("kind: PLAN_KIND_TRAINING or PLAN_KIND_INFERENCE")
        try:
            model = resolve_model(request.model, request.params_b)
        except PlanError as exc:
            raise InvalidArgument(f"model: {exc}") from None
        groups = [GpuGroup(g.site_id or "site", g.gpu_type, g.count) for g in request.gpus]
        links = {(lk.site_a, lk.site_b): LinkSpec(lk.latency_ms, lk.bandwidth_gbps) for lk in request.links}
        for lk in request.links:
            if lk.bandwidth_gbps <= 0 or lk.latency_ms < 0:
                raise InvalidArgument(f"links: {lk.site_a}-{lk.site_b} needs bandwidth > 0 and latency >= 0")
        if not groups:  # the free GPUs of the pool as it stands
            for cap in self.ad.capacity().values():
                if cap.up:
                    groups += [GpuGroup(cap.site_id, t, n) for t, n in sorted(cap.free_by_type.items()) if n > 0]
        if not request.links and self.ad.snapshot is not None:
            for s in self.ad.snapshot.sites:
                for measured in s.site.links:
                    links.setdefault((s.site.site_id, measured.peer_site_id),
                                     LinkSpec(measured.latency_ms, measured.bandwidth_gbps))
        if not groups:
            raise FailedPrecondition("no GPUs given and none free in the pool")
        return plan_on(request, model, groups, links)  # PlanError: INVALID_ARGUMENT or FAILED_PRECONDITION

    async def TriggerRebalance(self, request: apb.TriggerRebalanceRequest, context) -> apb.TriggerRebalanceResponse:
        if request.site_id and request.site_id not in self.ad.down:
            raise FailedPrecondition(f"site {request.site_id} is not down")
        actions = []
        for site_id in [request.site_id] if request.site_id else sorted(self.ad.down):
            actions += await self.ad.recover(site_id)
        if not request.site_id and self.ad.snapshot is not None and self.ad.settings.guardrails_enabled:
            actions += await self.ad.run_guardrails(self.ad.snapshot)
        return apb.TriggerRebalanceResponse(actions=actions)


__all__ = ["AdaptationServicer", "OPERATOR_ONLY"]
