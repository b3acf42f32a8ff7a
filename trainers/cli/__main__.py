"""``python -m trainers.cli``: the same as the ``whisper-experts`` command."""

import sys

from trainers.cli import main

sys.exit(main())
