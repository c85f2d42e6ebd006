"""`python -m skylab_trainer run ...`: how the local executor starts a trial."""

import sys

from skylab_trainer.cli import main

sys.exit(main())
