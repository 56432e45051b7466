"""`python -m services.perception`: run the perception service (settings from CNC_PERCEPTION_*)."""

import sys

from cncbrain.grpcserver import run
from cncbrain.settings import load_settings
from services.perception.server import serve
from services.perception.settings import Settings


def main() -> int:
    return run(lambda: serve(load_settings(Settings)))


if __name__ == "__main__":
    sys.exit(main())
