"""The student relevance model on Ray Serve: `import_path: ray_apps.student:app`.

`app` is an application builder: Ray Serve calls it with the application's `args` (a RayService's
`serveConfigV2.applications[].args`, or `serve run ray_apps.student:app model=<uri>`). The args are
`kubedistill.core.serve_app.AppArgs`: `model` (the exported student, local or s3://) plus `spec.serving`.
"""

from kubedistill.stages.serving import build_app as app

__all__ = ["app"]
