"""Stage `student-crsd`: train the student (CRSD, or the ce / kd baselines) with Ray Train; export it.

Run by `kubedistill run` (local Ray) or a RayJob (cluster) with KUBEDISTILL_STAGE_CONFIG set.
"""

from kubedistill.core import stage
from kubedistill.stages import student

if __name__ == "__main__":
    stage.main(student.run_stage)
