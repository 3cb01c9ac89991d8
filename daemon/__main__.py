"""``python -m daemon`` is the ``fine-tuner`` command line."""

import sys

from .cli import main

sys.exit(main())
