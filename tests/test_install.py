"""The wheel as users install it: one top-level package, commands that run outside the checkout."""

from __future__ import annotations

import json
import shutil
import site
import subprocess
import sys
import venv
import zipfile
from pathlib import Path

import pytest
from conftest import REPO, cli_env


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    # Built from a copy of the tracked files: a checkout's ignored build/ may hold modules
    # that no longer exist, and setuptools would pack them.
    tracked = subprocess.run(["git", "-C", str(REPO), "ls-files", "-z"], capture_output=True, check=True).stdout
    copy = tmp_path_factory.mktemp("source")
    for name in filter(None, tracked.decode().split("\0")):
        if (REPO / name).is_file():
            (copy / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, copy / name)
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation",
                    "-w", str(out), str(copy)], check=True, capture_output=True, text=True, timeout=300)
    (path,) = out.glob("edgemoe-*.whl")
    return path


def test_the_wheel_holds_only_the_edgemoe_package(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    top = {name.split("/")[0] for name in names}
    assert top == {"edgemoe", next(t for t in top if t.endswith(".dist-info"))}
    assert "edgemoe/protos/edgemoe_node_pb2_grpc.py" in names
    assert "edgemoe/coordinator/demo_weights/model.safetensors" in names
    # Exactly the modules of the source tree, development tools left out.
    shipped = {n for n in names if n.endswith(".py")}
    source = {f"edgemoe/{p.relative_to(REPO / folder)}" if folder == "edgemoe" else
              f"edgemoe/{folder}/{p.relative_to(REPO / folder)}"
              for folder in ("edgemoe", "coordinator", "node", "protos") for p in (REPO / folder).rglob("*.py")
              if "devtools" not in p.parts and "__pycache__" not in p.parts}
    assert shipped == source


@pytest.mark.slow
def test_a_plain_install_runs_the_demo_from_any_directory(wheel, tmp_path):
    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=False)
    bin_dir = env_dir / "bin"
    python = bin_dir / "python"
    purelib = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             capture_output=True, text=True, check=True).stdout.strip()
    # The dependencies come from the test's own environment by path; edgemoe itself only from the
    # wheel (a bare path entry does not run the checkout's editable-install hook).
    (Path(purelib) / "deps.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "--quiet", "--no-deps",
                    str(wheel)], check=True, capture_output=True, text=True, timeout=300)
    env = cli_env()
    env.pop("PYTHONPATH", None)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    where = subprocess.run([python, "-c", "import edgemoe, edgemoe.coordinator.cli as c; print(c.__file__)"],
                           capture_output=True, text=True, cwd=elsewhere, env=env, check=True).stdout
    assert where.startswith(purelib), where
    out = subprocess.run([bin_dir / "edgemoe", "demo", "--dir", str(tmp_path / "demo"), "--json"],
                         capture_output=True, text=True, cwd=elsewhere, env=env, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    report = json.loads(out.stdout.strip().splitlines()[-1])
    assert len(report["runs"]) == 2 and all(run["same_as_mlx_lm"] for run in report["runs"])
