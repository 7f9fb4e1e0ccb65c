#!/usr/bin/env bash
# Run HERE (the CPU machine, repository root, venv active) before benchmarks/gpu_check.sh runs on a GPU
# machine. That machine has torch/CUDA but not this project's other packages, and reaches neither the
# network nor ../shared: this puts wheels and a few test images under benchmarks/results/gpu/ (git-ignored),
# which the device call carries (carry: ["benchmarks/results/gpu"]). About 12 MB.
set -eu
cd "$(dirname "$0")/.."
PY=${PY:-python}
DATA=${DATA:-../shared/data}
DEST=benchmarks/results/gpu

# The packages the engine and service need beyond what the GPU image ships, at the versions used here.
PKGS="diffusers pytorch-msssim fastapi starlette uvicorn python-multipart pydantic pydantic-core
pydantic-settings python-dotenv annotated-types typing-inspection annotated-doc opentelemetry-api
importlib-metadata lazy-importer"
# shellcheck disable=SC2086
pins=$($PY - $PKGS <<'PYEOF'
import sys
from importlib.metadata import PackageNotFoundError, version
for name in sys.argv[1:]:
    try:
        print(f"{name}=={version(name)}")
    except PackageNotFoundError:
        pass
PYEOF
)
rm -rf "$DEST"
mkdir -p "$DEST/wheels" "$DEST/data/celeba" "$DEST/data/cifar10"
# shellcheck disable=SC2086
$PY -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d "$DEST/wheels" $pins 2> >(grep -v "is ignored: it is neither" >&2)

# Images: 300 CelebA (normal) + 100 CIFAR-10 (OOD), 64x64 PNGs.
$PY - "$DATA" "$DEST/data" <<'PYEOF'
import shutil, sys
from pathlib import Path
src, dst = Path(sys.argv[1]), Path(sys.argv[2])
for name, n in (("celeba", 300), ("cifar10", 100)):
    for path in sorted((src / name).glob("*.png"))[:n]:
        shutil.copy(path, dst / name / path.name)
PYEOF
ls "$DEST/wheels"
du -sh "$DEST"
