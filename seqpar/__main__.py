"""`python -m seqpar ...` (and `torchrun -m seqpar ...`): the `seqpar` command."""

import sys

from seqpar.cli.main import main

sys.exit(main())
