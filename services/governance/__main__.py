"""`python -m services.governance`: run the governance service (settings from CNC_GOVERNANCE_*)."""

import sys

from cncbrain.grpcserver import run
from cncbrain.settings import load_settings
from services.governance.server import serve
from services.governance.settings import Settings


def main() -> int:
    return run(lambda: serve(load_settings(Settings)))


if __name__ == "__main__":
    sys.exit(main())
