"""``python -m opdviz.cli``: the same as the ``opdviz`` command."""

import sys

from opdviz.cli import main

sys.exit(main())
