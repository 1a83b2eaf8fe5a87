#!/usr/bin/env bash
# Download, into .whl/, the wheels scripts/gpu-validate.sh installs on a GPU
# machine whose PyTorch image lacks pydantic (CPython 3.12, x86-64 Linux).
# Run where pip can reach a package index; .whl/ is not part of the repository.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d .whl pydantic==2.13.4 pydantic_core==2.46.4 annotated_types==0.7.0 typing_inspection==0.4.2 \
    typing_extensions==4.15.0
ls .whl
