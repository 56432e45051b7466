"""The scenario schema: what the twin runs — which network, which sites with which GPUs, which
inference services on which traces, which training jobs and which failures — as pydantic models
validated against the twin's cost model (models, GPU types) and traces. `parse_scenario` validates
the data of a scenario file; `cncbrain.scenario.load_scenario` finds one by name, family key or path.

Errors name the file, the field path and what was expected; unknown keys are errors.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from cncbrain.errors import ScenarioError
from cncbrain.twin import costmodel
from cncbrain.twin.traces import AZURE_TRACES

PositiveFloat = Annotated[float, Field(gt=0)]


def _known_model(name: str) -> str:
    if name.lower() not in costmodel.MODELS:
        raise ValueError(f"unknown model {name!r}; expected one of {', '.join(costmodel.MODELS)}")
    return name.lower()


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class SiteSpec(_Strict):
    """One site of a topology given inline (no GraphML file): where it is and who lives there."""

    name: Annotated[str, Field(min_length=1, max_length=80)]
    lat: Annotated[float, Field(ge=-90, le=90)]
    lon: Annotated[float, Field(ge=-180, le=180)]
    country: str = ""
    """ISO country code; the region of the site when `sites.region_by` is `country`."""
    population_m: PositiveFloat | None = None
    """People served from this site (millions): its `population` ingress weight. Unset: looked up
    by name in the built-in population table, else the mean of the others."""


class LinkSpec(_Strict):
    """One physical link of an inline topology, between two of its sites."""

    a: str
    b: str
    bandwidth_gbps: PositiveFloat | None = None
    """Unset: the topology's `default_bandwidth_gbps`."""


class TopologySpec(_Strict):
    graphml: str | None = None
    """A Topology Zoo GraphML file: a name in the built-in data folder, or a path (relative to the
    scenario file). Give either this or `sites` (+ `links`)."""
    sites: list[SiteSpec] = Field(default_factory=list)
    """An inline topology: the sites with their coordinates (instead of `graphml`)."""
    links: list[LinkSpec] = Field(default_factory=list)
    """The links of an inline topology (latency from great-circle distance, as for GraphML)."""
    default_bandwidth_gbps: PositiveFloat = 10.0
    """Bandwidth of links whose GraphML (or link entry) gives no speed."""
    per_hop_ms: Annotated[float, Field(ge=0)] = 0.5
    """Latency added per hop (routers, switching) on top of fibre propagation."""

    @model_validator(mode="after")
    def _one_source(self):
        if (self.graphml is None) == (not self.sites):
            raise ValueError("give either graphml (a GraphML file) or sites (an inline topology), not both or neither")
        if self.graphml is not None and self.links:
            raise ValueError("links belong to an inline topology (sites); a GraphML file brings its own")
        names = [s.name for s in self.sites]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"site names must be unique; repeated: {', '.join(dup)}")
        known = set(names)
        pairs = set()
        for n, link in enumerate(self.links):
            bad = [x for x in (link.a, link.b) if x not in known]
            if bad:
                raise ValueError(f"links.{n}: unknown site(s) {', '.join(map(repr, bad))}")
            if link.a == link.b:
                raise ValueError(f"links.{n}: a link joins two different sites, not {link.a!r} to itself")
            pair = frozenset((link.a, link.b))
            if pair in pairs:
                raise ValueError(f"links.{n}: {link.a!r}–{link.b!r} is listed twice")
            pairs.add(pair)
        return self

    def site_names(self) -> list[str] | None:
        """The inline sites' names (None for a GraphML topology)."""
        return [s.name for s in self.sites] if self.sites else None


Inventory = dict[str, Annotated[int, Field(ge=0)]]


class SampleSpec(_Strict):
    nodes_per_site: tuple[int, int] = (2, 6)
    """Range of Alibaba GPU nodes drawn per site (inclusive)."""


class SitesSpec(_Strict):
    default: Inventory = Field(default_factory=lambda: {"A100-80GB": 16})
    """GPUs per type at every site unless overridden."""
    overrides: dict[str, Inventory] = Field(default_factory=dict)
    """Per-site inventories by site name (the GraphML label)."""
    sample_from_alibaba: SampleSpec | None = None
    """If set, each site's inventory is drawn from the Alibaba GPU node list instead of `default`."""
    region_by: Literal["country", "site"] = "country"

    @field_validator("default", "overrides")
    @classmethod
    def _known_gpus(cls, v):
        known = costmodel.gpu_catalog()
        items = v.values() if v and isinstance(next(iter(v.values())), dict) else [v]
        for inv in items:
            for name in inv:
                if name not in known:
                    raise ValueError(f"unknown GPU type {name!r}; expected one of {', '.join(known)}")
        return v


class SloSpec(_Strict):
    ttft_s: PositiveFloat
    tpot_s: PositiveFloat


class RegionSpec(_Strict):
    """Demand concentrated around one site: `share` of it enters at the sites within `radius_km`
    of `around` (by population among them), the rest at every site by population."""

    around: str
    radius_km: PositiveFloat = 1000.0
    share: Annotated[float, Field(ge=0, le=1)] = 0.8


class RegionIngress(_Strict):
    region: RegionSpec


class InferenceSpec(_Strict):
    name: Annotated[str, Field(pattern=r"^[a-z][a-z0-9-]{0,40}$")]
    model: str
    trace: str
    rate_scale: PositiveFloat = 1.0
    ingress: Literal["population", "uniform"] | RegionIngress | dict[str, Annotated[float, Field(ge=0)]] = "population"
    """Where requests enter: `population` (sites weighted by population), `uniform`, a mapping of
    site → weight, or `{region: {around: SITE, radius_km: R, share: F}}`."""
    slo: SloSpec
    min_replicas: Annotated[int, Field(ge=0)] = 1
    max_replicas: Annotated[int, Field(ge=1)] = 64
    precision: Literal["bf16", "fp8"] = "bf16"
    request_weight: Annotated[int, Field(ge=1, le=1000)] = 1
    """The twin simulates one request in `request_weight` of the (rate-scaled) trace and counts each
    as that many — demand, queues, SLO counts and WAN bytes — so a pool with thousands of requests/s
    stays fast to simulate; 1 simulates every request."""

    _model = field_validator("model")(classmethod(lambda cls, v: _known_model(v)))

    @field_validator("trace")
    @classmethod
    def _trace(cls, v: str) -> str:
        if v not in AZURE_TRACES:
            raise ValueError(f"unknown trace {v!r}; expected one of {', '.join(AZURE_TRACES)}")
        return v

    @model_validator(mode="after")
    def _bounds(self):
        if self.min_replicas > self.max_replicas:
            raise ValueError(f"min_replicas ({self.min_replicas}) > max_replicas ({self.max_replicas})")
        return self


class ExplicitJob(_Strict):
    id: Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")]
    arrival_s: Annotated[float, Field(ge=0)]
    model: str
    gpus: Annotated[int, Field(ge=1)]
    runtime_s: PositiveFloat
    checkpoint_interval_s: PositiveFloat = 600.0

    _model = field_validator("model")(classmethod(lambda cls, v: _known_model(v)))


class TrainingSpec(_Strict):
    trace: Literal["alibaba", "none"] = "alibaba"
    jobs_per_hour: Annotated[float, Field(ge=0)] = 12.0
    load_scale: Annotated[float, Field(ge=0)] = 1.0
    gpu_scale: Annotated[int, Field(ge=1)] = 8
    checkpoint_interval_s: PositiveFloat = 600.0
    max_runtime_s: PositiveFloat = 5400.0
    jobs: list[ExplicitJob] = Field(default_factory=list)


class FailureSpec(_Strict):
    site: str
    at_s: Annotated[float, Field(ge=0)]
    duration_s: PositiveFloat


class Scenario(_Strict):
    name: str
    seed: int = 0
    duration_s: PositiveFloat = 3600.0
    tick_s: PositiveFloat = 30.0
    topology: TopologySpec
    sites: SitesSpec = Field(default_factory=SitesSpec)
    inference: list[InferenceSpec] = Field(default_factory=list)
    training: TrainingSpec = Field(default_factory=TrainingSpec)
    failures: list[FailureSpec] = Field(default_factory=list)
    source: str | None = Field(default=None, exclude=True)
    """Where the scenario was read from (set by the loader, not a YAML key)."""

    @model_validator(mode="after")
    def _check(self):
        names = [s.name for s in self.inference]
        dup = {n for n in names if names.count(n) > 1}
        if dup:
            raise ValueError(f"inference service names must be unique; repeated: {', '.join(sorted(dup))}")
        if self.tick_s > self.duration_s:
            raise ValueError(f"tick_s ({self.tick_s}) is longer than duration_s ({self.duration_s})")
        inline = self.topology.site_names()
        if inline is not None:
            problems = self.site_reference_errors(inline)
            if problems:
                raise ValueError("; ".join(problems))
        return self

    def site_reference_errors(self, names: list[str]) -> list[str]:
        """Every place the scenario names a site that `names` (the topology's sites) lacks, as
        'field path: problem' lines. Inline topologies are checked on load; GraphML ones when the
        pool is built (their site names are in the file)."""
        known = set(names)
        shown = ", ".join(names) if len(names) <= 60 else ", ".join(names[:60]) + f", … ({len(names)} sites)"
        out = []
        unknown = [n for n in self.sites.overrides if n not in known]
        if unknown:
            out.append(f"sites.overrides: unknown site(s) {', '.join(unknown)}; sites of this topology: {shown}")
        for n, f in enumerate(self.failures):
            if f.site not in known:
                out.append(f"failures.{n}.site: unknown site {f.site!r}; sites of this topology: {shown}")
        for n, svc in enumerate(self.inference):
            if isinstance(svc.ingress, RegionIngress):
                bad = [] if svc.ingress.region.around in known else [svc.ingress.region.around]
                field = f"inference.{n}.ingress.region.around"
            elif isinstance(svc.ingress, dict):
                bad = [x for x in svc.ingress if x not in known]
                field = f"inference.{n}.ingress"
            else:
                bad = []
            if bad:
                out.append(f"{field}: unknown site(s) {', '.join(map(repr, bad))}; sites of this topology: {shown}")
        return out

    def graphml_path(self) -> Path:
        if self.topology.graphml is None:
            raise ScenarioError(f"{self.source or self.name}: topology: inline sites, no GraphML file")
        p = Path(self.topology.graphml)
        if not p.is_absolute() and self.source and (Path(self.source).parent / p).exists():
            return Path(self.source).parent / p
        if p.exists():
            return p
        builtin = Path(str(resources.files("cncbrain") / "data" / "topologyzoo" / p.name))
        if builtin.exists():
            return builtin
        raise ScenarioError(f"{self.source or self.name}: topology.graphml: file {self.topology.graphml!r} not found")


def _format_errors(source: str, err: ValidationError) -> str:
    lines = []
    for e in err.errors():
        loc = ".".join(str(x) for x in e["loc"]) or "(top level)"
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            msg = "unknown key"
        elif e["type"] == "missing":
            msg = "required key is missing"
        lines.append(f"{source}: {loc}: {msg}")
    return "\n".join(lines)


def parse_scenario(data: object, source: str = "<scenario>") -> Scenario:
    if not isinstance(data, dict):
        raise ScenarioError(f"{source}: expected a mapping of scenario keys at the top level, got {type(data).__name__}")
    try:
        sc = Scenario.model_validate(data)
    except ValidationError as err:
        raise ScenarioError(_format_errors(source, err)) from None
    sc.source = source
    return sc
