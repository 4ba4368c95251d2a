"""``python -m knowtrace``: the knowtrace command."""

import sys

from .cli import main

sys.exit(main())
