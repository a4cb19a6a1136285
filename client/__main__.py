"""`python -m client COMMAND ...`: the user commands without the daemon's own (`run`)."""

import sys

from client.cli import main

sys.exit(main())
