#!/bin/sh
# Makes this example's own virtualenv: make-venv.sh VENV [PYTHON]
here=$(cd "$(dirname "$0")" && pwd)
exec "$here/../make-venv.sh" "$here/requirements.txt" "$@"
