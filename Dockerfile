# cvxtune: one image for the API and the worker (the command picks the role).
# Stage 1 builds a virtual environment with every dependency; stage 2 copies it into a slim
# runtime with a non-root user, so no compiler or pip cache ships.

FROM python:3.11-slim AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
# torch first, in its own layer: it is most of the image and changes least often.
RUN pip install torch==2.14.1 torchvision==0.29.1
WORKDIR /src
COPY pyproject.toml README.md ./
COPY solver ./solver
COPY workers ./workers
COPY app ./app
COPY cvxtune ./cvxtune
RUN pip install '.[worker,api]'

FROM python:3.11-slim AS runtime
ENV PATH=/opt/venv/bin:$PATH PYTHONUNBUFFERED=1 CVXTUNE_DATA_DIR=/data
COPY --from=build /opt/venv /opt/venv
RUN useradd --create-home --uid 1000 cvxtune && mkdir -p /data && chown cvxtune /data
USER cvxtune
WORKDIR /home/cvxtune
VOLUME ["/data"]
EXPOSE 8000
HEALTHCHECK --interval=15s --timeout=5s --start-period=60s --retries=5 \
  CMD python -c "import urllib.request as u; u.urlopen('http://127.0.0.1:8000/healthz', timeout=4)" || exit 1
ENTRYPOINT ["cvxtune"]
CMD ["serve", "--host", "0.0.0.0", "--port", "8000"]
