"""`python -m services.adaptation`: run the adaptation service (settings from CNC_ADAPTATION_*)."""

import sys

from cncbrain.grpcserver import run
from cncbrain.settings import load_settings
from services.adaptation.server import serve
from services.adaptation.settings import Settings


def main() -> int:
    return run(lambda: serve(load_settings(Settings)))


if __name__ == "__main__":
    sys.exit(main())
