"""``python -m tunelab`` (and ``accelerate launch -m tunelab``) run the same CLI as ``tunelab``."""

import sys

from tunelab.cli import main

sys.exit(main())
