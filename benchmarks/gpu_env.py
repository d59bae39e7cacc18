"""The Python environment ``gpu_check.sh`` runs in: versions, the GPU, what is missing.

    python benchmarks/gpu_env.py [--wheels DIR] [--require MODULE ...]

Prints Python, torch (CUDA build and device), Transformer Engine / apex presence and the
version and location of every required module; then, for each wheel in ``--wheels`` (installed
with ``--no-deps``, so pip checked nothing), its declared requirements that the environment does
not satisfy (missing, or another version: a warning, the code may still work). Exits 1, naming
the modules and what to do, when a required module cannot be imported.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata as md
import importlib.util
import platform
import sys
import zipfile
from pathlib import Path

#: What tests/test_cuda.py and the benchmarks import (module -> distribution to carry).
REQUIRED = {
    "torch": "torch",
    "numpy": "numpy",
    "megatron.core": "megatron-core",
    "datasets": "datasets",
    "dill": "dill",
    "multiprocess": "multiprocess",
    "pyarrow": "pyarrow",
    "pandas": "pandas",
    "xxhash": "xxhash",
    "yaml": "pyyaml",
    "safetensors": "safetensors",
    "psutil": "psutil",
    "tensorboard": "tensorboard",
    "pytest": "pytest",
}


def wheel_requirements(wheel: Path) -> tuple[str, list[str]]:
    """(distribution name, unconditional ``Requires-Dist`` lines) from a wheel's METADATA."""
    with zipfile.ZipFile(wheel) as z:
        meta = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
        text = z.read(meta).decode()
    name = next(x.split(":", 1)[1].strip() for x in text.splitlines() if x.startswith("Name:"))
    reqs = [
        x.split(":", 1)[1].strip()
        for x in text.splitlines()
        if x.startswith("Requires-Dist:") and "extra ==" not in x
    ]
    return name, reqs


def unmet(requirement: str) -> str | None:
    """Why ``requirement`` (PEP 508, no extras) is not met here, or None."""
    from packaging.markers import default_environment
    from packaging.requirements import Requirement

    req = Requirement(requirement)
    if req.marker is not None and not req.marker.evaluate(default_environment()):
        return None
    try:
        have = md.version(req.name)
    except md.PackageNotFoundError:
        return f"{req.name} is not installed"
    if req.specifier and not req.specifier.contains(have, prereleases=True):
        return f"{req.name} {have} installed, {req} declared"
    return None


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--wheels", help="directory of the carried wheels")
    ap.add_argument("--require", nargs="*", help="modules that must import (default: REQUIRED)")
    args = ap.parse_args()
    print(f"python {platform.python_version()} ({sys.executable})")
    missing = []
    for module in args.require if args.require is not None else REQUIRED:
        try:
            m = importlib.import_module(module)
        except Exception as e:  # noqa: BLE001 - any import failure is reported the same way
            missing.append(module)
            print(f"  {module:<14} MISSING ({type(e).__name__}: {str(e)[:200]})")
            continue
        version = getattr(m, "__version__", "") or _dist_version(module)
        print(f"  {module:<14} {version:<14} {Path(m.__file__ or '?').parent}")
    try:
        import torch

        cuda = torch.cuda.is_available()
        print(f"torch CUDA build {torch.version.cuda}, device available: {cuda}")
        if cuda:
            p = torch.cuda.get_device_properties(0)
            print(f"  device 0: {p.name}, {p.total_memory / 2**30:.0f} GiB, sm_{p.major}{p.minor}")
    except ImportError:
        pass
    for opt in ("transformer_engine", "apex"):
        found = importlib.util.find_spec(opt) is not None
        print(f"{opt}: {'installed' if found else 'not installed (fallbacks are used)'}")
    if args.wheels:
        wheels = sorted(Path(args.wheels).glob("*.whl"))
        print(f"carried wheels in {args.wheels}: {len(wheels)}")
        for w in wheels:
            name, reqs = wheel_requirements(w)
            problems = [p for p in map(unmet, reqs) if p]
            state = "; ".join(problems) if problems else "requirements met"
            print(f"  {w.name}: {state}")
    if missing:
        names = " ".join(REQUIRED.get(m, m) for m in missing)
        print(
            f"gpu_env: cannot import {', '.join(missing)}: download their wheels on a machine "
            f'with an index (make gpu-wheels GPU_WHEELS_EXTRA="{names}") and carry them'
        )
        return 1
    return 0


def _dist_version(module: str) -> str:
    try:
        return md.version(REQUIRED.get(module, module.split(".")[0]))
    except md.PackageNotFoundError:
        return "?"


if __name__ == "__main__":
    sys.exit(main())
