"""`python -m gputally.agent` runs the `gputally` command."""

import sys

from .cli import main

sys.exit(main())
