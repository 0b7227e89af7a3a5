"""``python -m gptlab``: the ``gptlab`` command, as ``torchrun ... -m gptlab pretrain ...`` starts it."""
import sys

from gptlab.cli import main

sys.exit(main())
