"""Helpers shared by the tests, imported as `support.<module>` (pytest puts tests/ on the path, as
it holds the root conftest.py):

- `support.waiting`: `until` (await a condition or fail naming it), `ended_within`;
- `support.specs`: a service spec, a site's status and a perception snapshot with the defaults the
  tests share;
- `support.line_pool`: a small pool of sites on a line, for the learned-policy tests;
- `support.fake_agents`: site agents played by a test (answers to the scheduler's offers);
- `support.cli`: `cncbrain` commands run as subprocesses;
- `support.nats_probe`: a client that speaks NATS without TLS (a TLS server must refuse it).
"""
