"""``python -m fedattn.cli``: how the launcher starts each party's process."""

import sys

from fedattn.cli.main import main

sys.exit(main())
