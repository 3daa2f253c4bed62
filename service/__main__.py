"""``python -m service``: the same as ``csist serve``."""

import sys

from service.main import main

sys.exit(main())
