"""`python -m gputally.cli` runs the `gputally` command."""

import sys

from .main import main

sys.exit(main())
