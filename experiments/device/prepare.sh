# Sourced by the device scripts here (first thing, from the repository root on the H200): wheels into /tmp/site,
# the mamba-ssm kernels built there once per warm machine (not with NO_KERNELS=1), and `el` (seconds since the call began).
# Needs, carried in the repository root: .whl/ (monai, nibabel, pynrrd wheels for Python 3.12) and .gpu/ (a copy
# of ../shared/gpu: build-kernels.sh and its sources).
set -uo pipefail
export PYTHONUNBUFFERED=1
T0=$(date +%s); el() { echo $(( $(date +%s) - T0 )); }
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
nvidia-smi --query-gpu=name,driver_version,memory.used --format=csv
if [ -z "${NO_KERNELS:-}" ] && ! PYTHONPATH=/tmp/site python3 -c "import mamba_ssm" 2>/dev/null; then bash .gpu/build-kernels.sh > /tmp/build.log 2>&1 || { tail -30 /tmp/build.log; exit 1; }; fi
echo "kernels ready at $(el) s"
