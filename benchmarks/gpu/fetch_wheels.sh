#!/usr/bin/env bash
# Downloads the optional comparison providers of the GPU benchmark (pure-Python wheels, PyPI) into
# .whl/ for the device machine, which has no package registry: device_check.sh installs them from
# there when the device tool carries .whl. Run on the development machine, from anywhere.
set -euo pipefail
cd "$(dirname "$0")/../.."
mkdir -p .whl
python3 -m pip download -q --no-deps --only-binary=:all: -d .whl \
  "late-interaction-kernels==0.4.5" "flash-maxsim==0.3.0"
ls -l .whl
