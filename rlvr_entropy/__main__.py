"""``python -m rlvr_entropy`` = the ``rlvr-entropy`` command (for torchrun / accelerate launch -m)."""

import sys

from rlvr_entropy.cli import main

sys.exit(main())
