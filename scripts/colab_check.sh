#!/usr/bin/env bash
# The Colab-shaped check of README's "How the Colab path is checked", as it was run:
#   bash scripts/colab_check.sh [WORKDIR] [CHAPTER ...]
# A fresh Python 3.12 venv with a torch other than the book's and the older transformers, peft,
# sentence-transformers and datasets that Colab preinstalls; a clone of this repository in WORKDIR;
# scripts/colab_setup.sh run from WORKDIR (the clone's parent, as the setup cell runs it); then each
# chapter copied into WORKDIR and executed there under nbval, one at a time; torch must be unchanged.
# Needs network access to PyPI (several GB: torch's CUDA build) and about 15 minutes on 2 cores.
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
work="${1:-/tmp/colab}"
shift || true
chapters=("$@")
if [[ ${#chapters[@]} -eq 0 ]]; then
    chapters=(1-transformers/03-attention 2-finetuning/03-beyond-lora 3-alignment/02-rlhf-with-ppo
              4-inference/03-flash-attention 5-retrieval/01-embeddings-and-vector-search)
fi
python312="${PYTHON312:-python3.12}"
mkdir -p "$work"
cd "$work"
[[ -d venv ]] || "$python312" -m venv venv
export PATH="$work/venv/bin:$PATH" LLMS_EXECUTED_CACHE="$work/cache" OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1
python -m pip install -q "torch==${TORCH_VERSION:-2.14.1}"
python -m pip install -q "torch==${TORCH_VERSION:-2.14.1}" "transformers>=4.50,<4.60" "peft>=0.15,<0.18" \
    "sentence-transformers>=5,<6" "datasets>=3,<5" "huggingface_hub<1" \
    numpy pandas matplotlib scipy scikit-learn ipykernel ipython nbval pytest
before="$(python -c 'import torch; print(torch.__version__)')"
rm -rf llms-executed && git clone -q "$repo" llms-executed
bash llms-executed/scripts/colab_setup.sh
cp llms-executed/conftest.py .
status=0
for chapter in "${chapters[@]}"; do
    cp "llms-executed/chapters/$chapter.ipynb" .
    name="$(basename "$chapter").ipynb"
    if python -m pytest "$name" --nbval-lax --nbval-cell-timeout=1200 -p no:cacheprovider -q \
        --save-executed executed; then echo "PASS $chapter"; else echo "FAIL $chapter"; status=1; fi
done
after="$(python -c 'import torch; print(torch.__version__)')"
echo "torch before: $before, after: $after"
[[ "$before" == "$after" ]] || status=1
exit $status
