"""`python -m brownout`: the same as the `brownout` command."""

import sys

from brownout.cli import main

sys.exit(main())
