"""``python -m fourbit`` runs the command line."""

import sys

from fourbit.cli import main

sys.exit(main())
