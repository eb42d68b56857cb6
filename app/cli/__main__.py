"""`python -m app.cli` (what torchrun and the trainer worker launch)."""

import sys

from app.cli import main

sys.exit(main())
