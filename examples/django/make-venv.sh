#!/bin/sh
# Makes the example's own virtualenv: make-venv.sh VENV [PYTHON]
# (PYTHON: /usr/bin/python3, the agent's default app interpreter.)
# Serve the app with it: agent_python VENV/bin/python; (agentctl serve --python VENV/bin/python).
set -eu
venv=${1:?usage: make-venv.sh VENV [PYTHON]}
python=${2:-/usr/bin/python3}
here=$(cd "$(dirname "$0")" && pwd)
"$python" -m venv "$venv"
"$venv/bin/pip" install -q --disable-pip-version-check -r "$here/requirements.txt"
# The workers run as an unprivileged user: they must read the virtualenv.
chmod -R a+rX "$venv"
