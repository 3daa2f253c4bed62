"""``python -m service``: the same as ``csist serve``."""

import sys

from service.api.server import main

sys.exit(main())
