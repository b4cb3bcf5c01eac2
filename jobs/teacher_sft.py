"""Stage `teacher-sft`: supervised fine-tuning of the teacher to write a reasoning chain and a label, with Ray Train.

Run by `kubedistill run` (local Ray) or a RayJob (cluster) with KUBEDISTILL_STAGE_CONFIG set.
"""

from kubedistill.core import stage
from kubedistill.stages.teacher import stages

if __name__ == "__main__":
    stage.main(stages.run_sft)
