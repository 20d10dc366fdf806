"""`python -m agent.cli ...`: agentctl without the console script."""

import sys

from agent.cli.agentctl import main

sys.exit(main())
