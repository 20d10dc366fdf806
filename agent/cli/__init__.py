"""The command line: agentctl and serve."""
