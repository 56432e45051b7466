"""CNC Brain core package: the digital twin, scenarios, policies, settings and the shared plumbing
(NATS bus, subject registry, telemetry) that the services and the site agents import."""

__version__ = "0.1.0"
