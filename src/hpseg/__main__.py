"""python -m hpseg"""

import sys

from hpseg.cli import main

sys.exit(main())
