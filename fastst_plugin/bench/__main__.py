"""``python -m fastst_plugin.bench train|encode|report ...``"""

import sys

from . import main

sys.exit(main())
