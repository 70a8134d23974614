"""`python -m hipseg` is the `hipseg` command."""

import sys

from hipseg.cli import main

sys.exit(main())
