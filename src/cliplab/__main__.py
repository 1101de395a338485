"""``python -m cliplab`` (and ``torchrun -m cliplab``) runs the CLI."""

import sys

from cliplab.cli import main

sys.exit(main())
