#!/usr/bin/env bash
# Build an offline wheelhouse for a GPU node whose Python image lacks some of AVO's dependencies.
#
#   slurm/wheelhouse.sh [DEST=.whl] [PYVER=3.12] [SET=all|harness|external]
#
# SET=harness fetches only what `python -m avo.bench` and tests/gpu need (Hydra, OmegaConf,
# pyelftools, submitit: about 1 MB); SET=all adds polars and openai for the search (about 57 MB,
# mostly polars' native runtime); SET=external adds the MCP SDK and its server stack for
# agent=external (about 7 MB more; the SDK needs a newer pydantic, which then replaces all's).
#
# Downloads, with no dependency resolution, exactly the packages the CUDA node image lacks
# (its image already has torch, numpy, pyarrow, cuda-core/-bindings, httpx, anyio, tqdm, pyyaml,
# packaging, cloudpickle, typing-extensions), at the versions this repository pins. Pure-Python
# packages published only as source (antlr4-python3-runtime 4.9.3) are built into py3-none-any
# wheels here. Install on the node, with no network:
#
#   python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site DEST/*.whl
#   export PYTHONPATH=/tmp/site:$PYTHONPATH
#
# or into a virtual environment: python3 -m pip install --no-index --find-links DEST avo[...]
set -euo pipefail

DEST=${1:-.whl}
PYVER=${2:-3.12}
SET=${3:-all}
PY=${PYTHON:-python3}
ROOT=$(cd "$(dirname "$0")/.." && pwd)

# name==version; versions match those this repository is developed and tested with.
BINARY=(hydra-core==1.3.2 omegaconf==2.3.0 submitit==1.5.4 pyelftools==0.33)
SEARCH=(
  polars==2.1.0 polars-runtime-32==2.1.0
  openai==1.109.1 pydantic==2.11.9 pydantic-core==2.33.2 annotated-types==0.7.0
  typing-inspection==0.4.2 jiter==0.11.0 distro==1.9.0 sniffio==1.3.1
)
# agent=external: mcp and what it needs beyond the image and SEARCH (pydantic>=2.12 wants a newer
# typing-extensions than some images have; anyio>=4.10 for httpx2)
EXTERNAL=(
  mcp==2.3.0 mcp-types==2.3.0 httpx2==2.16.2 httpcore2==2.16.2 truststore==0.10.5 idna==3.20 h11==0.16.0
  anyio==4.16.0 typing-extensions==4.16.0 jsonschema==4.26.0 jsonschema-specifications==2025.9.1
  referencing==0.37.0 rpds-py==0.30.0 attrs==26.1.0 opentelemetry-api==1.45.2 python-multipart==0.0.34
  sse-starlette==3.7.0 starlette==1.10.0 uvicorn==0.54.0 click==8.4.0 pyjwt==2.15.1 cryptography==48.0.0
  cffi==2.0.0 pycparser==3.0
)
SDIST_PURE=(antlr4-python3-runtime==4.9.3)
case "$SET" in
  all) BINARY+=("${SEARCH[@]}") ;;
  harness) ;;
  external)  # one version of each package: the SDK's pydantic replaces SEARCH's
    for spec in "${SEARCH[@]}"; do
      case "$spec" in pydantic==*|pydantic-core==*|typing-inspection==*) ;; *) BINARY+=("$spec") ;; esac
    done
    BINARY+=(pydantic==2.13.4 pydantic-core==2.46.4 typing-inspection==0.4.2 "${EXTERNAL[@]}") ;;
  *) echo "wheelhouse: SET must be 'all', 'harness' or 'external', got '$SET'" >&2; exit 2 ;;
esac

PLATFORMS=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64
           --platform manylinux2014_x86_64 --platform manylinux1_x86_64 --platform any)
mkdir -p "$DEST"
# one version of each package only: two versions of one name stop the whole offline install
for spec in "${BINARY[@]}"; do
  name=${spec%%==*}
  echo "wheelhouse: $spec"
  "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version "$PYVER" --implementation cp \
    "${PLATFORMS[@]}" -d "$DEST" "$spec"
done
for spec in "${SDIST_PURE[@]}"; do
  echo "wheelhouse: $spec (pure Python, built here)"
  "$PY" -m pip wheel -q --no-deps --no-binary=:all: -w "$DEST" "$spec"
done

if [ -d "$ROOT/.git" ] && mkdir -p "$ROOT/.git/info" && ! grep -qx '/.whl/' "$ROOT/.git/info/exclude" 2>/dev/null; then
  echo '/.whl/' >> "$ROOT/.git/info/exclude"
fi
du -sh "$DEST" | awk '{print "wheelhouse: " $1 " in " $2}'
ls "$DEST"
