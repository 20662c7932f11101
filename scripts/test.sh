#!/usr/bin/env bash
# Install everything (scripts/setup.sh) and run the test suite with real napari viewers under Xvfb.
# Extra arguments go to pytest, e.g.  bash scripts/test.sh -k slide -x
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export QT_QPA_PLATFORM=xcb NAPARI_ASYNC=0 PYTHONFAULTHANDLER=1
exec xvfb-run -a -s "-screen 0 1600x1200x24" .venv/bin/python -m pytest "$@"
