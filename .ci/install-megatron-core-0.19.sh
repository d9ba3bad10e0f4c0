#!/usr/bin/env bash
# Install megatron-core 0.19.x (MEGATRON_CORE_VERSION, default the newest 0.19 release, 0.19.2) and this project into the virtualenv VENV (created if missing), on
# Python 3.11: 0.19's wheel metadata says Requires-Python >=3.12, but its code runs on 3.11, so it
# is built from its sdist (helpers_cpp included, about 15 s). The one 3.12-only name it imports,
# typing.override, is backported by a sitecustomize.py in VENV only (never in the package).
#
#     bash .ci/install-megatron-core-0.19.sh venv-mc019 && venv-mc019/bin/python -m pytest -q tests
set -euo pipefail
VENV=${1:?usage: $0 VENV}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
PIP="$VENV/bin/python -m pip --quiet --disable-pip-version-check"
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
$PIP install torch==2.13.0 numpy pybind11 setuptools wheel packaging
MC=${MEGATRON_CORE_VERSION:-0.19.2}
SDIST=$(mktemp -d)
$PIP download --no-deps --no-binary=:all: --ignore-requires-python -d "$SDIST" "megatron-core==$MC"
$PIP install --no-build-isolation --ignore-requires-python "$SDIST"/megatron_core-"$MC".tar.gz
SITE=$("$VENV/bin/python" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
cat > "$SITE/sitecustomize.py" <<'PY'
# Test environment only: megatron-core 0.19 imports typing.override (Python 3.12+).
import typing

if not hasattr(typing, "override"):
    typing.override = lambda f: f
PY
# the project as the README installs it (without --ignore-requires-python: numpy etc. stay wheels)
$PIP install -e "$ROOT[test,dali,eval]"
"$VENV/bin/python" -c "import megatron.core, megatron.training.models; print('megatron-core', megatron.core.__version__)"
