"""``python -m hgdpo ...``: the ``hgdpo`` command without the installed console script."""

import sys

from hgdpo.cli import main

sys.exit(main())
