#!/usr/bin/env bash
# Download, here (PyPI reachable), the wheels benchmarks/gpu_check.sh installs on the GPU
# machine (imagecodecs is left out: 26 MB, and the check reads no compressed TIFF) (Python 3.12, x86-64; it already has torch, CuPy, NumPy, SciPy, scikit-image,
# matplotlib, pandas, numba, h5py, pillow, pyyaml, typer, tqdm...). Into .whl/ (git-ignored;
# the device tool carries it with carry [".whl"]). Versions: those of this project's .venv.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
PKGS=(
  abTEM==1.0.11 ase==3.29.0 pyFFTW==0.15.1 tabulate==0.10.0
  dask==2026.8.0 distributed==2026.8.0 partd==1.4.2 locket==1.0.0 tblib==3.2.2
  tornado==6.6.1 zict==3.0.0 zarr==3.1.6 numcodecs==0.16.6 donfig==0.8.1.post1
  google-crc32c==1.9.0 tifffile==2026.3.3 mrcfile==1.5.4
  ipywidgets==8.1.9 comm==0.2.3 traitlets==5.16.1 widgetsnbextension==4.0.16
  jupyterlab_widgets==3.0.17 ipython==9.18.1 ipython_pygments_lexers==1.1.1 jedi==0.20.1
  parso==0.8.7 prompt_toolkit==3.0.53 wcwidth==0.9.4 stack-data==0.6.3 executing==2.3.0
  asttokens==3.0.2 pure_eval==0.2.4 matplotlib-inline==0.2.2 pexpect==4.9.0
  ptyprocess==0.7.0 decorator dask-cuda
)
PLAT=()
for n in 28 27 24 17; do PLAT+=(--platform "manylinux_2_${n}_x86_64"); done
PLAT+=(--platform manylinux2014_x86_64 --platform manylinux1_x86_64 --platform any)
mkdir -p .whl
for p in "${PKGS[@]}"; do
  $PY -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp "${PLAT[@]}" -d .whl "$p" || echo "NOT FETCHED: $p"
done
du -sh .whl
