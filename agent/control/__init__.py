"""The status socket: its server, what it shows, metrics, tokens, the dashboard and the client agentctl uses."""
