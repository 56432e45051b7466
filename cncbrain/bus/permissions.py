"""Who may do what on the bus: one NATS identity per process role and per site agent, each with the
subjects it may publish and subscribe to, the JetStream API calls it may make and the KV buckets
it may write (least privilege). `cncbrain.bus.credentials` turns this table into the server's
`authorization` block; docs/security.md prints it for people.

Identities: `admin` (provisioning and the operator's own tools: everything), `governance`,
`scheduler`, `perception`, `adaptation`, `emulator`, and `site-<site id>` for each site agent. A
restarted process, or a second (standby) instance of the same service, uses the same identity.

JetStream through permissions (nats-server 2.10+): a consumer is created on
`$JS.API.CONSUMER.CREATE.<stream>.<name>.<filter>`, so a grant can pin both the consumer's name
and the subjects it may read (a site reads only its own placements); a stream's messages can also
be read by `STREAM.MSG.GET`/`DIRECT.GET`, granted only where the whole stream may be read. Every
identity gets its own reply-inbox prefix (`_INBOX.<identity>`), so no identity can listen to
another's replies, and `allow_responses` lets a responder answer a request without a publish grant
on the requester's inbox. Nobody but `admin` may update, purge or delete a stream or delete its
messages (but governance, which replaces the object of its own object store and so purges the old
object's chunks there); an owner may create its own streams (idempotent; `up` provisions them as
admin first).
"""

from __future__ import annotations

from dataclasses import dataclass, field

ADMIN = "admin"
SERVICES = ("governance", "scheduler", "perception", "adaptation", "emulator")
SITE_PREFIX = "site-"

# Streams and KV buckets of the brain and who creates (owns) each. Other blocks' streams are named
# here by string (the bus sits below them); tests/unit/test_permissions.py checks this against the
# registered streams and buckets.
STREAM_OWNERS = {
    "CNC_WORKLOADS": "scheduler",
    "CNC_PLACEMENTS": "scheduler",
    "CNC_SITES": "perception",
    "CNC_DEADLETTER": "perception",
    "CNC_ADAPTATION": "adaptation",
    "CNC_LEDGER": "governance",
}
BUCKET_OWNERS = {
    "cnc-workloads": "scheduler",
    "cnc-sites": "perception",
    "cnc-adaptation": "adaptation",
    "cnc-tokens": "governance",
    "cnc-governance": "governance",
    "cnc-ledger-head": "governance",
    # one lease per service role, its active instance's (`cncbrain.lease`)
    "cnc-lease-governance": "governance",
    "cnc-lease-scheduler": "scheduler",
    "cnc-lease-perception": "perception",
    "cnc-lease-adaptation": "adaptation",
}
OBJECT_OWNERS = {
    # governance's signed checkpoint of its folded state (services/governance/checkpoint.py)
    "cnc-ledger-checkpoint": "governance",
}


SITE_EVENTS = ("registered", "heartbeat", "telemetry", "proposal", "answer", "applied")
"""What a site agent publishes about its own site (`cnc.site.<site>.<event>`). Not `answers`: a
batch of several sites' answers comes from an agent host (`host`), on its own subject."""


def inbox_prefix(identity: str) -> str:
    """The reply-inbox prefix of an identity's connection (`Bus.connect` sets it)."""
    return f"_INBOX.{identity}"


def site_identity(site_id: str) -> str:
    return f"{SITE_PREFIX}{site_id}"


@dataclass
class Grant:
    """What one identity may do: NATS subjects (wildcards allowed) it may publish and subscribe to."""

    identity: str
    publish: list[str] = field(default_factory=list)
    subscribe: list[str] = field(default_factory=list)
    allow_responses: bool = False
    creates: list[str] = field(default_factory=list)
    """Streams (and `KV_<bucket>` streams) this identity creates at start."""

    def pub(self, *subjects: str) -> Grant:
        self.publish.extend(s for s in subjects if s not in self.publish)
        return self

    def sub(self, *subjects: str) -> Grant:
        self.subscribe.extend(s for s in subjects if s not in self.subscribe)
        return self

    # --- JetStream ---------------------------------------------------------------------------------
    def read_stream(self, stream: str) -> Grant:
        """Read a whole stream: consumers of any name and filter, direct and message gets, acks."""
        api = "$JS.API"
        return self.pub(f"{api}.STREAM.INFO.{stream}", f"{api}.CONSUMER.CREATE.{stream}",
                        f"{api}.CONSUMER.CREATE.{stream}.>", f"{api}.CONSUMER.DURABLE.CREATE.{stream}.>",
                        f"{api}.CONSUMER.INFO.{stream}.>", f"{api}.CONSUMER.DELETE.{stream}.>",
                        f"{api}.CONSUMER.MSG.NEXT.{stream}.>", f"{api}.STREAM.MSG.GET.{stream}",
                        f"{api}.DIRECT.GET.{stream}", f"{api}.DIRECT.GET.{stream}.>",
                        f"$JS.ACK.{stream}.>", f"$JS.FC.{stream}.>")

    def read_filtered(self, stream: str, consumer: str, filter_subject: str) -> Grant:
        """One named (durable) consumer on `stream`, reading only `filter_subject`."""
        api = "$JS.API"
        return self.pub(f"{api}.STREAM.INFO.{stream}", f"{api}.CONSUMER.CREATE.{stream}.{consumer}.{filter_subject}",
                        f"{api}.CONSUMER.INFO.{stream}.{consumer}", f"{api}.CONSUMER.DELETE.{stream}.{consumer}",
                        f"$JS.ACK.{stream}.{consumer}.>", f"$JS.FC.{stream}.{consumer}.>")

    def create(self, stream: str) -> Grant:
        self.creates.append(stream)
        return self.pub(f"$JS.API.STREAM.CREATE.{stream}", f"$JS.API.STREAM.INFO.{stream}")

    def read_bucket(self, bucket: str) -> Grant:
        return self.read_stream(f"KV_{bucket}")

    def get_from_bucket(self, bucket: str) -> Grant:
        """Single-key reads of a bucket (no listing, no watch)."""
        api, stream = "$JS.API", f"KV_{bucket}"
        return self.pub(f"{api}.STREAM.INFO.{stream}", f"{api}.STREAM.MSG.GET.{stream}",
                        f"{api}.DIRECT.GET.{stream}", f"{api}.DIRECT.GET.{stream}.>")

    def write_objects(self, bucket: str) -> Grant:
        """Put, read and replace objects of an object store (stream `OBJ_<bucket>`). Replacing an
        object purges the old one's chunks from that stream: the one purge a service may make, and
        only of its own object store. Reading an object looks its stream up by subject
        (`STREAM.NAMES`, which lists names only)."""
        return self.read_stream(f"OBJ_{bucket}").pub(f"$O.{bucket}.>", f"$JS.API.STREAM.PURGE.OBJ_{bucket}",
                                                     "$JS.API.STREAM.NAMES")

    def write_bucket(self, bucket: str) -> Grant:
        """Read, put, update (compare-and-set) and delete keys of a bucket."""
        return self.read_bucket(bucket).pub(f"$KV.{bucket}.>")

    def as_permissions(self) -> dict:
        """The nats-server `permissions` map of this grant."""
        out: dict = {"publish": {"allow": sorted(self.publish)},
                     "subscribe": {"allow": sorted([*self.subscribe, f"{inbox_prefix(self.identity)}.>"])}}
        if self.allow_responses:
            out["allow_responses"] = True
        return out


def _service(name: str) -> Grant:
    """A service may move any event it cannot handle to the dead-letter stream. A service with a
    gRPC API holds its role's lease (active-standby, `cncbrain.lease`) in a bucket of its own."""
    g = Grant(name).pub("cnc.deadletter.>")
    bucket = f"cnc-lease-{name}"
    if bucket in BUCKET_OWNERS:
        g.create(f"KV_{bucket}").write_bucket(bucket)
    return g


def _auth_feed(g: Grant) -> Grant:
    """Every gRPC service checks bearer tokens against governance's (signed) token records."""
    return g.read_bucket("cnc-tokens")


def governance() -> Grant:
    g = _auth_feed(_service("governance"))
    g.create("CNC_LEDGER").read_stream("CNC_LEDGER").pub("cnc.governance.ledger")
    for bucket in ("cnc-tokens", "cnc-governance", "cnc-ledger-head"):
        g.create(f"KV_{bucket}").write_bucket(bucket)
    g.create("OBJ_cnc-ledger-checkpoint").write_objects("cnc-ledger-checkpoint")
    g.sub("cnc.perception.snapshot")
    g.read_stream("CNC_WORKLOADS").read_stream("CNC_ADAPTATION")  # durable consumers: usage, audit
    g.get_from_bucket("cnc-workloads")  # the tenant of a workload
    return g


def scheduler() -> Grant:
    g = _auth_feed(_service("scheduler"))
    for stream in ("CNC_WORKLOADS", "CNC_PLACEMENTS", "KV_cnc-workloads"):
        g.create(stream)
    g.read_stream("CNC_WORKLOADS").read_stream("CNC_PLACEMENTS").write_bucket("cnc-workloads")
    g.pub("cnc.scheduler.>")
    g.sub("cnc.perception.snapshot", "cnc.site.*.answer", "cnc.site.*.answers", "cnc.site.*.proposal")
    g.read_stream("CNC_SITES").read_stream("CNC_ADAPTATION")  # executors' reports, adaptation's actions
    g.read_bucket("cnc-governance")  # the governance gate: tenants, policies, holdings
    return g


def perception() -> Grant:
    g = _auth_feed(_service("perception"))
    for stream in ("CNC_SITES", "CNC_DEADLETTER", "KV_cnc-sites"):
        g.create(stream)
    g.read_stream("CNC_SITES").write_bucket("cnc-sites")
    g.pub("cnc.perception.>")
    g.sub("cnc.site.*.heartbeat", "cnc.site.*.telemetry")
    g.read_bucket("cnc-governance")  # enrolled sites
    # the live web page: the workload records, recent and new adaptation actions
    g.read_bucket("cnc-workloads").read_stream("CNC_ADAPTATION").sub("cnc.adaptation.action")
    return g


def adaptation() -> Grant:
    g = _auth_feed(_service("adaptation"))
    g.create("CNC_ADAPTATION").create("KV_cnc-adaptation").write_bucket("cnc-adaptation")
    g.pub("cnc.adaptation.>")
    g.sub("cnc.perception.snapshot")
    g.read_stream("CNC_SITES").read_bucket("cnc-workloads").read_bucket("cnc-governance")
    g.read_stream("CNC_ADAPTATION")  # its own recent actions, read back at start
    return g


def emulator() -> Grant:
    g = _service("emulator")
    g.allow_responses = True  # answers the site agents' inventory and apply requests
    g.pub("cnc.emulator.state.*")
    g.sub("cnc.emulator.inventory.*", "cnc.emulator.apply.*", "cnc.emulator.fail.*")
    # its container's health check asks it for every site's inventory, as the site agents do
    g.pub("cnc.emulator.inventory.*")
    return g


def site(site_id: str) -> Grant:
    """A site agent: its own site's subjects only; every offer round (the pool's decentralised
    scheduling asks every enrolled site) and snapshot; its own placements; the workload records'
    specs by key (the learned policy's view); its own emulated hardware (the emulated executor)."""
    g = Grant(site_identity(site_id))
    agent = f"agent-{site_id}"
    g.pub(*(f"cnc.site.{site_id}.{event}" for event in SITE_EVENTS))
    g.pub(f"cnc.emulator.inventory.{site_id}", f"cnc.emulator.apply.{site_id}")
    g.pub(*(f"cnc.deadletter.{agent}{suffix}" for suffix in ("", "-offers", "-snapshot", "-state")))
    g.sub("cnc.scheduler.offer", "cnc.perception.snapshot", f"cnc.emulator.state.{site_id}")
    g.read_filtered("CNC_PLACEMENTS", agent, f"cnc.scheduler.placement.{site_id}")
    # an executor without state first reads its placements to the end (`SiteAgent.catch_up`)
    g.read_filtered("CNC_PLACEMENTS", f"{agent}-catchup", f"cnc.scheduler.placement.{site_id}")
    g.pub(f"$JS.API.CONSUMER.MSG.NEXT.CNC_PLACEMENTS.{agent}-catchup")
    g.get_from_bucket("cnc-workloads")
    return g


def host(identity: str, sites: list[str]) -> Grant:
    """An agent process hosting several sites (`cncbrain agent --identity agents-<name>`; `up`'s
    agents): each hosted site's own grant, and one batch of their answers per offer round on
    `cnc.site.<identity>.answers`. The scheduler takes an answer from the batch only for a site
    whose registration (which only its speakers may publish) names this identity as its agent."""
    g = Grant(identity)
    for site_id in sites:
        one = site(site_id)
        g.pub(*one.publish).sub(*one.subscribe)
    g.pub(f"cnc.site.{identity}.answers")
    return g


def admin() -> Grant:
    g = Grant(ADMIN).pub(">").sub(">")
    g.allow_responses = True
    return g


ROLES = {"governance": governance, "scheduler": scheduler, "perception": perception,
         "adaptation": adaptation, "emulator": emulator, ADMIN: admin}


HOST_PREFIX = "agents-"


def grant_for(identity: str, hosts: dict[str, list[str]] | None = None) -> Grant:
    """The grant of a role (`scheduler`, …), a site identity (`site-<id>`) or an agent host
    (`agents-<name>`, hosting the sites `hosts[identity]`)."""
    if identity in ROLES:
        return ROLES[identity]()
    if identity.startswith(SITE_PREFIX) and len(identity) > len(SITE_PREFIX):
        return site(identity[len(SITE_PREFIX):])
    if identity.startswith(HOST_PREFIX) and hosts and identity in hosts:
        return host(identity, hosts[identity])
    raise KeyError(f"no NATS identity {identity!r}: roles are {', '.join(ROLES)}, site-<id> and agents-<name> "
                   "(with its sites)")


def may_create(identity: str | None, stream: str) -> bool:
    """Whether `identity` creates `stream` (None: a connection without auth, which may do anything)."""
    if identity is None or identity == ADMIN:
        return True
    try:
        return stream in grant_for(identity).creates
    except KeyError:
        return False


def _summary(g: Grant) -> dict[str, list[str]]:
    """What a grant amounts to, in the words of the table in docs/security.md."""
    api = "$JS.API."
    reads, gets, filtered = set(), set(), []
    for p in g.publish:
        if p.startswith(api + "CONSUMER.CREATE.") and p.endswith(".>"):
            reads.add(p[len(api + "CONSUMER.CREATE."):-2])
        elif p.startswith(api + "CONSUMER.CREATE.") and p.count(".") > 5:
            stream, consumer, *rest = p[len(api + "CONSUMER.CREATE."):].split(".")
            filtered.append(f"{stream} (consumer `{consumer}`, only `{'.'.join(rest)}`)")
        elif p.startswith(api + "STREAM.MSG.GET."):
            gets.add(p[len(api + "STREAM.MSG.GET."):])
    writes = sorted(p[len("$KV."):-2] for p in g.publish if p.startswith("$KV.") and p != "$KV.>")
    objects = sorted(p[len("$O."):-2] for p in g.publish if p.startswith("$O.") and p != "$O.>")
    return {
        "publishes": [p for p in g.publish if not p.startswith(("$JS", "$KV", "$O."))],
        "subscribes": list(g.subscribe),
        "creates": list(g.creates),
        "reads": sorted(reads) + filtered + [f"{s} (single keys)" for s in sorted(gets - reads)],
        "writes": [f"KV {b}" for b in writes] + [f"objects {b} (and purges their replaced chunks)" for b in objects],
    }


def markdown_table() -> str:
    """The permission table of docs/security.md (a test keeps the two the same)."""
    def cell(items: list[str]) -> str:
        return ", ".join(i if "`" in i or i.startswith("each ") else f"`{i}`" for i in items) or "—"

    rows = ["| identity | publishes | subscribes | creates | reads (streams, KV as `KV_<bucket>`) | writes |",
            "| --- | --- | --- | --- | --- | --- |"]
    for identity in (*SERVICES, "site-<id>", "agents-<name>", ADMIN):
        g = grant_for(identity.replace("<id>", "ID0").replace("<name>", "NAME"), {"agents-NAME": ["ID0"]})
        if identity == ADMIN:
            rows.append("| `admin` | everything | everything | every stream and bucket | everything | everything, "
                        "and the only one that updates, purges (but governance's checkpoint store) or deletes streams |")
            continue
        s = {k: [v.replace("ID0", "<id>").replace("NAME", "<name>") for v in vs] for k, vs in _summary(g).items()}
        if identity.startswith(HOST_PREFIX):  # hosting sites <id>: each one's row, and the batch
            s["publishes"] = ["each hosted site's", "`cnc.site.agents-<name>.answers`"]
            s["subscribes"], s["reads"] = ["each hosted site's"], ["each hosted site's"]
        rows.append(f"| `{identity}` | {cell(s['publishes'])} | {cell(s['subscribes'])} | {cell(s['creates'])} | "
                    f"{cell(s['reads'])} | {cell(s['writes'])} |")
    return "\n".join(rows)
