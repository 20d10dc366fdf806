#!/bin/sh
# Makes an example's own virtualenv: make-venv.sh REQUIREMENTS VENV [PYTHON]
# (PYTHON: /usr/bin/python3, the agent's default app interpreter.)
# Serve the app with it: agent_python VENV/bin/python; (agentctl serve --python VENV/bin/python).
set -eu
requirements=${1:?usage: make-venv.sh REQUIREMENTS VENV [PYTHON]}
venv=${2:?usage: make-venv.sh REQUIREMENTS VENV [PYTHON]}
python=${3:-/usr/bin/python3}
"$python" -m venv "$venv"
"$venv/bin/pip" install -q --disable-pip-version-check -r "$requirements"
# The workers run as an unprivileged user: they must read the virtualenv.
chmod -R a+rX "$venv"
