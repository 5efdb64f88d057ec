"""python -m fim_linops demo"""

import sys

from fim_linops.cli import main

sys.exit(main())
