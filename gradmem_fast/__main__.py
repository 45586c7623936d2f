"""``python -m gradmem_fast write | read | demo`` (also under ``torchrun -m gradmem_fast``)."""

import sys

from .cli import main

sys.exit(main())
