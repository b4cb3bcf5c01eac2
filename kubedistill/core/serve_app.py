"""The contract between the pipeline and the student's Ray Serve app: its name, import path and args.

The `serve` stage (local) and the operator's RayService (`serveConfigV2`) build the same args here; the
app (`kubedistill.stages.serving.build_app`, behind `ray_apps.student:app`) validates them. Kept apart
from the app so the operator renders a RayService without importing FastAPI or torch.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from kubedistill.core.spec import ServingSpec
from kubedistill.core.storage import S3Options

#: `import_path` of the app in a RayService and in `serve run`
IMPORT_PATH = "ray_apps.student:app"
APP_NAME = "student"


class AppArgs(ServingSpec):
    """The application's arguments: `serveConfigV2.applications[].args` in a RayService, or `build_app(args)`."""

    model: str = Field(min_length=1, description="The exported student: a local directory or an s3:// prefix.")
    runtime: Literal["torch", "onnx", "onnx-int8"] = Field(
        default="torch", description="What scores requests, as the pipeline resolved spec.serving.runtime."
    )
    storage_endpoint: str | None = Field(default=None, description="S3 endpoint override (as spec.storage.endpoint).")
    storage_region: str | None = None

    def s3(self) -> S3Options:
        return S3Options.from_env(self.storage_endpoint, self.storage_region)


def app_args(serving: ServingSpec, model_uri: str, runtime: str, endpoint: str | None, region: str | None) -> AppArgs:
    """The app's args: `spec.serving`, the promoted model's URI and runtime, and `spec.storage`'s endpoint and region."""
    return AppArgs.model_validate(
        {
            **serving.model_dump(),
            "model": model_uri,
            "runtime": runtime,
            "storage_endpoint": endpoint,
            "storage_region": region,
        }
    )
