from __future__ import annotations

import sys

from sweeper.cli import main

sys.exit(main())
