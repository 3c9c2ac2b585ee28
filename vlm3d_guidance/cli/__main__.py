"""``python -m vlm3d_guidance.cli``: the same as ``vlm3d-guide``."""

import sys

from . import main

sys.exit(main())
