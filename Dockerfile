# One image for the operator and for every stage's Ray pods (KubeRay runs `python -m kubedistill.job
# <stage function>` from the working directory, /app). Not built by CI (no container runtime there).
#   docker build -t ghcr.io/kubedistill/kubedistill:0.1.0 .
#   docker build --build-arg BASE=rayproject/ray:2.60.0-py311-gpu -t ghcr.io/kubedistill/kubedistill:0.1.0-gpu .
#   (the annotate stage's `engine: auto` uses vLLM where the image has it: add the GPU build, e.g.
#    --build-arg EXTRA_PIP="vllm==<a release built for the base image's torch and CUDA>"; not checked here)
ARG BASE=rayproject/ray:2.60.0-py311
FROM ${BASE}
ARG EXTRA_PIP=""
WORKDIR /app
COPY --chown=1000:100 pyproject.toml README.md ./
COPY --chown=1000:100 kubedistill ./kubedistill
RUN pip install --no-cache-dir ".[operator]" ${EXTRA_PIP}
COPY --chown=1000:100 ray_apps ./ray_apps
COPY --chown=1000:100 operator ./operator
# ray_apps.student:app (the RayService's import path) and nothing fetched at run time
ENV PYTHONPATH=/app HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
USER 1000
