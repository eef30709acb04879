#!/usr/bin/env bash
# Prepare one command that runs the whole test suite on a GPU machine (CI has no GPU, so nothing else runs the CUDA
# paths: the torch / Triton search, fp16 storage, kNN generation on the device).
#
# Usage, from anywhere in the checkout (needs PyPI; the GPU machine needs no network):
#   scripts/gpu-tests.sh [extra pinned packages, e.g. transformers==5.24.0]
# It downloads the wheels the GPU machine lacks into ./.whl and writes the runner ./.gpu-tests/run.sh (both ignored
# by git), then prints the command to run there. The GPU machine is expected to have Python 3.12 on x86-64 with
# torch (CUDA), transformers, accelerate, peft, huggingface_hub, sacrebleu, pyarrow, pandas, tqdm and numpy;
# datasets, evaluate, faiss-cpu and the dependencies they add (dill, multiprocess) travel as wheels.
# Environment: PYTHON (local interpreter with pip, default python3), GPU_PYTHON_VERSION (default 3.12).
set -euo pipefail
top=$(git rev-parse --show-toplevel)
cd "$top"
py=${PYTHON:-python3}
pyver=${GPU_PYTHON_VERSION:-3.12}
"$py" -m pip --version >/dev/null 2>&1 || { echo "error: $py has no pip (set PYTHON=...)" >&2; exit 1; }

pkgs=(datasets==5.2.0 evaluate==0.4.6 faiss-cpu==1.15.1 dill==0.4.1 multiprocess==0.70.19 "$@")
mkdir -p .whl .gpu-tests
for p in "${pkgs[@]}"; do
  "$py" -m pip download -q --no-deps --only-binary=:all: --python-version "$pyver" --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl "$p" 2>&1 | grep -v '^WARNING' || true
  name=${p%%[=<>]*}
  ls .whl | grep -qi "^${name//-/_}-" || { echo "error: no wheel of $p for cp${pyver/./} downloaded" >&2; exit 1; }
done

cat > .gpu-tests/run.sh <<'RUN'
#!/usr/bin/env bash
# Runs on the GPU machine, from the project root (written by scripts/gpu-tests.sh; args go to pytest).
set -uo pipefail
site=${TMPDIR:-/tmp}/hf-realm-site
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" .whl/*.whl \
  || exit 1
# Exported, so that processes the tests launch (accelerate, torchrun, subprocess) import the same packages.
export PYTHONPATH="$site:$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
out=${OUT:-.}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__, \
'cuda', torch.cuda.is_available())"
python3 -c "import torch; assert torch.cuda.is_available(), 'no CUDA device: the CUDA tests would be skipped'" \
  || exit 1
args=("$@"); [ ${#args[@]} -gt 0 ] || args=(-q -rfEs)
python3 -m pytest -p no:cacheprovider --junitxml "$out/pytest-gpu.xml" "${args[@]}" 2>&1 \
  | tee "$out/pytest-gpu.log" | tail -60
exit "${PIPESTATUS[0]}"
RUN
chmod +x .gpu-tests/run.sh

echo "wheels: $(ls .whl/*.whl | wc -l) in .whl ($(du -sh .whl | cut -f1))"
echo "On the GPU machine, with .whl/ and .gpu-tests/ copied beside the checkout, run from the project root:"
echo "  bash .gpu-tests/run.sh            # the whole suite, slow tests off; or: bash .gpu-tests/run.sh -m slow -x"
echo "The log goes to \$OUT/pytest-gpu.log (and pytest-gpu.xml), or to the project root when OUT is unset."
