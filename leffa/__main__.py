"""``python -m leffa``: the command-line application (``cli``), which sits on top of this library."""

import sys

from cli.main import main

sys.exit(main())
