"""Stage `serve`: deploy the student on this Ray cluster with Ray Serve and probe it once.

Run by `kubedistill run` (local Ray) with KUBEDISTILL_STAGE_CONFIG set; in a cluster the operator
creates a RayService from the same application args instead.
"""

from kubedistill.core import stage
from kubedistill.stages import serving

if __name__ == "__main__":
    stage.main(serving.run_stage)
