"""`python -m hipseg` is the `hipseg` command (also as ``torchrun -m hipseg train ...``)."""

import os
import sys

from hipseg.cli import main

if "TORCHELASTIC_RUN_ID" in os.environ:
    # Under torchrun: a failing rank's traceback goes into the agent's error report.
    from torch.distributed.elastic.multiprocessing.errors import record

    main = record(main)

sys.exit(main())
