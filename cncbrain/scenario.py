"""Scenarios: a YAML file, validated by pydantic, that says which network, which sites with which
GPUs, which inference services on which traces, which training jobs and which failures the twin
runs. Built-in scenarios live in `cncbrain/scenarios/` and are usable by name.

Errors name the file, the field path and what was expected; unknown keys are errors.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import Annotated, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from cncbrain.errors import ScenarioError
from cncbrain.twin import physics
from cncbrain.twin.traces import AZURE_TRACES

PositiveFloat = Annotated[float, Field(gt=0)]


def _known_model(name: str) -> str:
    if name.lower() not in physics.MODELS:
        raise ValueError(f"unknown model {name!r}; expected one of {', '.join(physics.MODELS)}")
    return name.lower()


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class TopologySpec(_Strict):
    graphml: str
    """A Topology Zoo GraphML file: a name in the built-in data folder, or a path (relative to the
    scenario file)."""
    default_bandwidth_gbps: PositiveFloat = 10.0
    """Bandwidth of links whose GraphML gives no speed."""
    per_hop_ms: Annotated[float, Field(ge=0)] = 0.5
    """Latency added per hop (routers, switching) on top of fibre propagation."""


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
        known = physics.gpu_catalog()
        items = v.values() if v and isinstance(next(iter(v.values())), dict) else [v]
        for inv in items:
            for name in inv:
                if name not in known:
                    raise ValueError(f"unknown GPU type {name!r}; expected one of {', '.join(known)}")
        return v


class SloSpec(_Strict):
    ttft_s: PositiveFloat
    tpot_s: PositiveFloat


class InferenceSpec(_Strict):
    name: Annotated[str, Field(pattern=r"^[a-z][a-z0-9-]{0,40}$")]
    model: str
    trace: str
    rate_scale: PositiveFloat = 1.0
    ingress: Literal["population", "uniform"] | dict[str, Annotated[float, Field(ge=0)]] = "population"
    slo: SloSpec
    min_replicas: Annotated[int, Field(ge=0)] = 1
    max_replicas: Annotated[int, Field(ge=1)] = 64
    precision: Literal["bf16", "fp8"] = "bf16"

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
        return self

    def graphml_path(self) -> Path:
        p = Path(self.topology.graphml)
        if not p.is_absolute() and self.source and (Path(self.source).parent / p).exists():
            return Path(self.source).parent / p
        if p.exists():
            return p
        builtin = Path(str(resources.files("cncbrain") / "data" / "topologyzoo" / p.name))
        if builtin.exists():
            return builtin
        raise ScenarioError(f"{self.source or self.name}: topology.graphml: file {self.topology.graphml!r} not found")


def scenarios_dir() -> Path:
    return Path(str(resources.files("cncbrain") / "scenarios"))


def builtin_scenarios() -> dict[str, Path]:
    return {p.stem: p for p in sorted(scenarios_dir().glob("*.yaml"))}


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


def load_scenario(name_or_path: str | Path) -> Scenario:
    """A built-in scenario by name (`abilene`, `geant`, …) or a YAML file by path."""
    key = str(name_or_path)
    builtin = builtin_scenarios()
    if key in builtin:
        path = builtin[key]
    else:
        path = Path(key)
        if not path.exists():
            raise ScenarioError(
                f"scenario {key!r}: no such file and not a built-in scenario (built-in: {', '.join(builtin)})"
            )
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ScenarioError(f"{path}: not valid YAML: {exc}") from None
    return parse_scenario(data, str(path))
