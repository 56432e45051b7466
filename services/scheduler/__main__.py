"""`python -m services.scheduler`: run the scheduler service (settings from CNC_SCHEDULER_*)."""

import sys

from cncbrain.grpcserver import run
from cncbrain.settings import load_settings
from services.scheduler.server import serve
from services.scheduler.settings import Settings


def main() -> int:
    return run(lambda: serve(load_settings(Settings)))


if __name__ == "__main__":
    sys.exit(main())
