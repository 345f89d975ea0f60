"""`python -m seqpar.bench.engine`."""

import sys

from seqpar.bench.engine import main

sys.exit(main())
