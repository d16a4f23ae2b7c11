"""The built wheel carries its configs: installed into a fresh venv, `python -m fluxtrain --cfg job` works anywhere."""

import os
import subprocess
import sys
import sysconfig
import venv

import pytest

from .conftest import REPO_ROOT


@pytest.mark.slow
def test_wheel_in_fresh_venv_finds_its_configs(tmp_path):
    dist = tmp_path / "dist"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(dist),
            str(REPO_ROOT),
        ],
        check=True,
        capture_output=True,
        timeout=300,
    )
    wheel = next(dist.glob("fluxtrain-*.whl"))
    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=False)
    python = env_dir / "bin" / "python"
    subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(python), "install", "-q", "--no-deps", "--no-index", str(wheel)],
        check=True,
        capture_output=True,
        timeout=300,
    )
    # The dependencies come from this environment's site-packages; a path added through a .pth file does not run
    # that folder's own .pth files, so the editable install of the repository stays invisible.
    site = next((env_dir / "lib").glob("python*/site-packages"))
    (site / "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")

    clean_env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    workdir = tmp_path / "elsewhere"
    workdir.mkdir()
    where = subprocess.run(
        [str(python), "-c", "import fluxtrain; print(fluxtrain.__file__)"],
        cwd=workdir,
        env=clean_env,
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    ).stdout
    assert where.startswith(str(site)), where
    out = subprocess.run(
        [str(python), "-m", "fluxtrain", "--cfg", "job", "model=large"],
        cwd=workdir,
        env=clean_env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    assert "d_model: 512" in out.stdout and "n_layers: 6" in out.stdout
