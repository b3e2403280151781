# cvxtune: one image for the API and the worker (the command picks the role).
# Stage 1 builds a virtual environment with every dependency; stage 2 copies it into a slim
# runtime with a non-root user, so no compiler, source tree or pip cache ships.
#
# Where torch comes from (build args; the legacy builder is enough, no BuildKit needed):
#   default                    pip's index (PyPI): the CUDA build of torch and its nvidia-*
#                              wheels (~5 GB installed), so one image runs on CPU and on a GPU;
#   TORCH_INDEX_URL=URL        another index, e.g. https://download.pytorch.org/whl/cpu for a
#                              CPU-only image several GB smaller;
#   TORCH_FIND_LINKS=URL       only the wheels at URL (pip --no-index --find-links), e.g. a local
#                              wheelhouse served on loopback during a host-network build:
#                              deploy/compose-check.sh shows how.

FROM python:3.11-slim AS build
ARG TORCH_VERSION=2.14.1
ARG TORCHVISION_VERSION=0.29.1
ARG TORCH_INDEX_URL=
ARG TORCH_FIND_LINKS=
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
# torch first, in its own layer: it is most of the image and changes least often.
RUN src=""; \
    if [ -n "$TORCH_FIND_LINKS" ]; then src="--no-index --find-links $TORCH_FIND_LINKS"; \
    elif [ -n "$TORCH_INDEX_URL" ]; then src="--index-url $TORCH_INDEX_URL"; fi; \
    pip install $src "torch==$TORCH_VERSION" "torchvision==$TORCHVISION_VERSION" \
    && pip freeze | grep -E '^(torch|torchvision)==' > /opt/torch-pins.txt
WORKDIR /src
COPY pyproject.toml README.md ./
COPY solver ./solver
COPY workers ./workers
COPY app ./app
COPY cvxtune ./cvxtune
# The pins keep the torch chosen above: the project's own dependencies never swap it.
RUN pip install --constraint /opt/torch-pins.txt '.[worker,api]'

FROM python:3.11-slim AS runtime
ENV PATH=/opt/venv/bin:$PATH PYTHONUNBUFFERED=1 CVXTUNE_DATA_DIR=/data
# malloc keeps freed memory for the next batch (cvxtune/memory.py: 1.2-1.7x faster forwards on a
# CPU); the cvxtune commands would otherwise start themselves again to set it.
ENV GLIBC_TUNABLES=glibc.malloc.mmap_threshold=1073741824:glibc.malloc.trim_threshold=1073741824:glibc.malloc.arena_max=1
COPY --from=build /opt/venv /opt/venv
# /data is created here and owned by the user, so a fresh named volume mounted there inherits
# that ownership and the non-root process can write to it.
RUN useradd --create-home --uid 1000 --user-group cvxtune && mkdir -p /data && chown cvxtune: /data
USER 1000:1000
WORKDIR /home/cvxtune
VOLUME ["/data"]
EXPOSE 8000
HEALTHCHECK --interval=15s --timeout=5s --start-period=60s --retries=5 \
  CMD python -c "import urllib.request as u; u.urlopen('http://127.0.0.1:8000/healthz', timeout=4)" || exit 1
ENTRYPOINT ["cvxtune"]
CMD ["serve", "--host", "0.0.0.0", "--port", "8000"]
