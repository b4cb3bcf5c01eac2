"""Stage `teacher-dapt`: domain-adaptive pre-training of the teacher (causal LM on the domain corpus), with Ray Train.

Run by `kubedistill run` (local Ray) or a RayJob (cluster) with KUBEDISTILL_STAGE_CONFIG set.
"""

from kubedistill.core import stage
from kubedistill.stages.teacher import stages

if __name__ == "__main__":
    stage.main(stages.run_dapt)
