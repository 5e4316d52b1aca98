"""`python -m orca8k` = the `orca8k` command."""

import sys

from orca8k.cli import main

sys.exit(main())
