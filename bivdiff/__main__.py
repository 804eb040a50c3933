"""`python -m bivdiff`, as `accelerate launch -m bivdiff batch ...` starts it."""

import sys

from bivdiff.cli import main

sys.exit(main())
