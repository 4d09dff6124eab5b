"""`python -m prefect_nanobanana.cli`: the same as the `nanobanana` script."""

import sys

from . import main

sys.exit(main())
