"""`python -m service` is the `hogwild` command."""

import sys

from service.cli import main

if __name__ == "__main__":
    sys.exit(main())
