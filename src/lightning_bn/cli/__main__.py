"""``python -m lightning_bn.cli``: the ``lightning-bn`` command."""

import sys

from lightning_bn.cli import main

sys.exit(main())
