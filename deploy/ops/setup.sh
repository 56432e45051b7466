#!/usr/bin/env bash
# Install the operations tools the tests drive (Debian packages), each only when missing:
#   prometheus                 the real Prometheus server, scraping a running brain (tests/integration/test_operations.py)
#   chromium, chromium-driver  headless Chromium, loading the brain's web page (the same file)
# Exits non-zero when a package cannot be had; the tests that need it then skip with the reason.
# Then builds the font cache once, so that Chromium's first start in the tests does not.
"$(dirname "$0")/../apt-ensure.sh" prometheus chromium chromium-driver || exit $?
if command -v fc-cache >/dev/null; then fc-cache >/dev/null 2>&1 || true; fi
