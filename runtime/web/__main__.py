"""``python -m runtime.web``: the web operator console (see ``runtime.web.server``)."""

import sys

from runtime.web.server import main

sys.exit(main())
