#!/usr/bin/env bash
# Install the operations tools the tests drive (Debian packages), each only when missing:
#   prometheus                 the real Prometheus server, scraping a running brain (tests/integration/test_operations.py)
#   chromium, chromium-driver  headless Chromium, loading the brain's web page (tests/integration/test_web_page.py)
# Exits non-zero when a package cannot be had; the tests that need it then skip with the reason.
exec "$(dirname "$0")/../apt-ensure.sh" prometheus chromium chromium-driver
