"""Every stage of the pipeline, declared once: what runs it, what it reads, what it needs, when it runs.

`pipeline.build` turns these declarations and a DistillationRun into the run's stage graph; the local
runner, the operator's renderer, `kubedistill plan`, the docs and the tests all read that graph. Adding a
stage is its module (a function `StageContext -> {"metrics", "outputs"}`) and one entry here.

A stage is one Ray job, `python -m kubedistill.job <run>`; its config (the spec paths in `reads`, as
JSON in an env var) is re-validated into the spec's own models on the worker (`StageContext.spec`), and
a path not declared here cannot be read there. Nothing in this module imports a stage: the operator
reads the registry without loading torch or Ray.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from kubedistill.core.spec import DistillationRunSpec, Resources, annotates, prunes_annotator, rationalizes

#: The synthetic worlds' generator revision (`kubedistill.stages.synthetic`, `world`): 2 splits queries by hash
#: (`synthetic.query_split`); data made by revision 1 (splits filled in turn) is not reused for a synthetic run.
SYNTHETIC_REVISION = "synthetic-2"
#: How the reward model's `grounding` pairs are built (`teacher.pairs.misread_service`); in the reward-model stage's
#: config hash only where that dimension is trained, so other runs' reward models stay reusable when it changes.
GROUNDING_REVISION = "grounding-2"

#: How every teacher stage runs: its Ray workers and its budget of worker failures.
_TEACHER_RUN = ("teacher.resources", "teacher.maxFailures", "teacher.maxLength", "teacher.gradientCheckpointing")
#: ... and what every teacher stage's training draw depends on (not prune-search's: it has its own seed)
_TEACHER_TRAINING = ("teacher.seed", *_TEACHER_RUN)


def one_cpu(spec: DistillationRunSpec) -> Resources:
    """A single one-CPU worker: stages that read, score or deploy rather than train."""
    return Resources(workers=1, cpus_per_worker=1, gpus_per_worker=0)


@dataclass(frozen=True)
class StageDef:
    """One stage, as the pipeline knows it."""

    name: str
    #: the stage's body, `module:function` (a `StageFn`); `python -m kubedistill.job <run>` runs it
    run: str
    #: dotted spec paths (camelCase, as on the wire) the stage reads; its config hash covers them
    reads: tuple[str, ...]
    #: the stages whose outputs it reads, given the spec; None when the spec disables it
    inputs: Callable[[DistillationRunSpec], tuple[str, ...] | None]
    #: what each of its Ray workers gets
    resources: Callable[[DistillationRunSpec], Resources] = one_cpu
    #: (min, max) workers when the stage's cluster autoscales; None: a fixed `resources.workers`
    autoscale: Callable[[DistillationRunSpec], tuple[int, int]] | None = None
    #: deploys a long-running service (a RayService in a cluster): acts on every run, never skipped as done
    service: bool = False
    #: runs only when the evaluation gate passed (promotion of the student)
    gated: bool = False
    #: what its output depends on beyond the spec, given the spec (a generator's revision); in the config hash when
    #: set, so a run made by an older revision is rebuilt instead of reused as done
    code: Callable[[DistillationRunSpec], str | None] = lambda s: None


def _explains_for_teacher(s: DistillationRunSpec) -> bool:
    """Whether the teacher's SFT set takes its reasoning from the rationalize stage: only when another LLM
    (`spec.annotation.model`) explains the labels; the teacher cannot explain its own training set (nor can its
    pruned copy)."""
    return rationalizes(s) and s.teacher.enabled and s.annotation.model is not None and not prunes_annotator(s)


def _prune_inputs(s: DistillationRunSpec) -> tuple[str, ...] | None:
    """The data (its SFT and eval sets), and the teacher-dpo model unless another is named (`spec.pruning.model`)."""
    if not s.pruning.enabled:
        return None
    if s.pruning.model:
        return ("data",)
    return ("data", "teacher-dpo") if s.teacher.enabled else None


def _teacher(*inputs: str, reads_sft: bool = True) -> Callable[[DistillationRunSpec], tuple[str, ...] | None]:
    """A teacher stage after `inputs`; one that reads the SFT set also after rationalize when that explains it."""
    return lambda s: (
        (*inputs, *(("rationalize",) if reads_sft and _explains_for_teacher(s) else ())) if s.teacher.enabled else None
    )


def _llm_inputs(s: DistillationRunSpec) -> tuple[str, ...]:
    """The data, and the trained teacher unless another LLM is named (`spec.annotation.model`): the pruned teacher
    (`prune-search`) comes from that stage."""
    if prunes_annotator(s):
        return ("data", "prune-search")
    return ("data", "teacher-dpo") if s.teacher.enabled and s.annotation.model is None else ("data",)


def _annotate_inputs(s: DistillationRunSpec) -> tuple[str, ...] | None:
    return _llm_inputs(s) if annotates(s) else None


def _rationalize_inputs(s: DistillationRunSpec) -> tuple[str, ...] | None:
    return _llm_inputs(s) if rationalizes(s) else None


def _annotate_resources(s: DistillationRunSpec) -> Resources:
    a = s.annotation
    return Resources(workers=a.replicas.max, cpus_per_worker=a.cpus_per_replica, gpus_per_worker=a.gpus_per_replica)


def _llm_replicas(s: DistillationRunSpec) -> tuple[int, int]:
    """The annotating LLM's pool (annotate, rationalize) scales between these."""
    return s.annotation.replicas.min, s.annotation.replicas.max


def _learns_from_annotations(s: DistillationRunSpec) -> bool:
    """Whether the student's rows (`data.training_rows`) include the annotate stage's (`spec.student.trainOn`)."""
    return annotates(s) and s.student.train_on != "labels"


def _learns_from_labels(s: DistillationRunSpec) -> bool:
    return s.student.train_on in ("labels", "both") or (s.student.train_on == "auto" and not annotates(s))


def _student_inputs(s: DistillationRunSpec) -> tuple[str, ...] | None:
    if not s.student.enabled:
        return None
    return (
        ("data",)
        + (("annotate",) if _learns_from_annotations(s) else ())
        + (("rationalize",) if rationalizes(s) and _learns_from_labels(s) else ())
    )


def _evaluate_inputs(s: DistillationRunSpec) -> tuple[str, ...]:
    # the baseline learns from the rows the student learns from
    return (
        ("data",)
        + (("annotate",) if _learns_from_annotations(s) else ())
        + (("student-crsd",) if s.student.enabled else ())
    )


STAGES: tuple[StageDef, ...] = (
    StageDef(
        "data",
        "kubedistill.stages.data:run_stage",
        reads=("data", "labels"),
        inputs=lambda s: (),
        code=lambda s: None if s.data.logs else SYNTHETIC_REVISION,
    ),
    StageDef(
        "teacher-dapt",
        "kubedistill.stages.teacher.stages:run_dapt",
        reads=("teacher.baseModel", "teacher.dapt", *_TEACHER_TRAINING),
        inputs=_teacher("data", reads_sft=False),
        resources=lambda s: s.teacher.resources,
    ),
    StageDef(
        "teacher-sft",
        "kubedistill.stages.teacher.stages:run_sft",
        reads=("labels", "teacher.sft", "teacher.maxNewTokens", "teacher.preferenceHoldout", *_TEACHER_TRAINING),
        inputs=_teacher("data", "teacher-dapt"),
        resources=lambda s: s.teacher.resources,
    ),
    StageDef(
        "reward-model",
        "kubedistill.stages.teacher.stages:run_reward",
        reads=(
            "labels",
            "teacher.rewardModel",
            "teacher.maxNewTokens",
            "teacher.preferenceHoldout",
            *_TEACHER_TRAINING,
        ),
        inputs=_teacher("data", "teacher-sft"),
        resources=lambda s: s.teacher.resources,
        code=lambda s: GROUNDING_REVISION if "grounding" in s.teacher.reward_model.dimensions else None,
    ),
    StageDef(
        "teacher-dpo",
        "kubedistill.stages.teacher.stages:run_dpo",
        reads=(
            "labels",
            "teacher.dpo",
            "teacher.rewardModel.dimensions",
            "teacher.maxNewTokens",
            "teacher.preferenceHoldout",
            *_TEACHER_TRAINING,
        ),
        inputs=_teacher("data", "teacher-sft", "reward-model"),
        resources=lambda s: s.teacher.resources,
    ),
    StageDef(
        "annotate",
        "kubedistill.stages.annotate:run_stage",
        reads=("labels", "annotation"),
        inputs=_annotate_inputs,
        resources=_annotate_resources,
        autoscale=_llm_replicas,
    ),
    StageDef(
        "rationalize",
        "kubedistill.stages.annotate:run_rationalize",
        reads=("labels", "annotation"),
        inputs=_rationalize_inputs,
        resources=_annotate_resources,
        autoscale=_llm_replicas,
    ),
    StageDef(
        "student-crsd",
        "kubedistill.stages.student:run_stage",
        reads=("labels", "student"),
        inputs=_student_inputs,
        resources=lambda s: s.student.resources,
    ),
    StageDef(
        "evaluate",
        "kubedistill.stages.evaluate:run_stage",
        reads=(
            "labels",
            "evaluation",
            "student.compareObjectives",
            "student.trainOn",
            # the baseline is weighted and offset like the student (kubedistill.stages.evaluate.baseline_for)
            "student.train.classWeights",
            "student.train.customClassWeights",
            "student.train.sampling",
            "student.calibration.offsets",
            "student.validationFraction",
            "student.validateOn",
            "student.seed",
        ),
        inputs=_evaluate_inputs,
    ),
    StageDef(
        "prune-search",
        "kubedistill.stages.prune_search:run_stage",
        reads=("labels", "pruning", "teacher.maxNewTokens", *_TEACHER_RUN),
        inputs=_prune_inputs,
        resources=lambda s: s.teacher.resources,
    ),
    StageDef(
        "serve",
        "kubedistill.stages.serving:run_stage",
        reads=("labels", "serving"),
        inputs=lambda s: ("student-crsd", "evaluate") if s.serving.enabled and s.student.enabled else None,
        service=True,
        gated=True,
    ),
)
