"""`python -m seqpar.bench.attention`."""

import sys

from seqpar.bench.attention import main

sys.exit(main())
