"""Stage `data`: generate the synthetic search log, or validate and ingest the user's logs.

Run by `kubedistill run` (local Ray) or a RayJob (cluster) with KUBEDISTILL_STAGE_CONFIG set.
"""

from kubedistill.core import stage
from kubedistill.stages import data

if __name__ == "__main__":
    stage.main(data.run_stage)
