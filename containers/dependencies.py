"""The image's dependencies (containers/Dockerfile), in two steps of its build.

`dependencies.py PYPROJECT --except NAME…` prints the project's runtime dependencies, one per line, leaving
out the named ones: the image installs them before it copies the sources, so that a code change does not
reinstall them, and reads them from the one place they are declared.
`dependencies.py --check-cpu` fails unless the installed torch is a CPU build and no `nvidia-*`
distribution came in with anything else.

Standard library only (torch is imported only by the check): it runs in the image's bare virtual
environment."""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import re
import sys
import tomllib


def _name(requirement: str) -> str:
    match = re.match(r"[A-Za-z0-9._-]+", requirement.strip())
    if not match:
        raise SystemExit(f"cannot read a name in the requirement {requirement!r}")
    return re.sub(r"[-_.]+", "-", match.group(0)).lower()  # PEP 503


def check_cpu() -> None:
    torch = importlib.import_module("torch")
    if torch.version.cuda:
        sys.exit(f"not a CPU build: torch {torch.__version__}, CUDA {torch.version.cuda}")
    cuda = sorted(
        name
        for d in importlib.metadata.distributions()
        if (name := d.metadata["Name"] or "").lower().startswith("nvidia-")
    )
    if cuda:
        sys.exit(f"CUDA packages came in: {', '.join(cuda)}")
    print(f"torch {torch.__version__}, CPU only")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("pyproject", nargs="?")
    parser.add_argument("--except", dest="left_out", nargs="*", default=[], metavar="NAME")
    parser.add_argument("--check-cpu", action="store_true")
    args = parser.parse_args()
    if args.check_cpu:
        return check_cpu()
    if not args.pyproject:
        parser.error("the path of pyproject.toml is needed")
    with open(args.pyproject, "rb") as f:
        requirements = tomllib.load(f)["project"]["dependencies"]
    left_out = {_name(n) for n in args.left_out}
    unknown = left_out - {_name(r) for r in requirements}
    if unknown:  # a renamed dependency must not silently stay in the image
        raise SystemExit(f"not dependencies of the project: {', '.join(sorted(unknown))}")
    for requirement in requirements:
        if _name(requirement) not in left_out:
            print(requirement)


if __name__ == "__main__":
    main()
