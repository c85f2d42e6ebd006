import sys

from skylab.cli import main

sys.exit(main())
