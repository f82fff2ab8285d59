"""``python -m dicomnode`` is the same as the ``dicomnode`` command."""

import sys

from dicomnode.cli import main

sys.exit(main())
