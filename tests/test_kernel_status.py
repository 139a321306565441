"""The C kernels' state is visible: `--version` says whether they run and why not, and a
failed build stops the install instead of leaving every merge silently slower."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from mergesmith.native.status import ABI, source_hash

REPO = Path(__file__).resolve().parents[1]


def version_line(env: dict[str, str] | None = None) -> str:
    done = subprocess.run(
        [sys.executable, "-m", "mergesmith", "--version"],
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
        check=True,
    )
    return done.stdout.strip()


def test_version_says_the_kernels_are_in_use_or_switched_off() -> None:
    line = version_line()
    assert line.startswith("mergesmith 0.1.0; C kernels ")
    if os.environ.get("MERGESMITH_REQUIRE_KERNELS"):
        assert "C kernels in use" in line
    off = version_line({"MERGESMITH_KERNELS": "torch"})
    assert "C kernels switched off" in off and "MERGESMITH_KERNELS=torch" in off


@pytest.fixture()
def package_copy(tmp_path: Path) -> Path:
    """The package without its compiled kernels, importable ahead of the installed one."""
    shutil.copytree(REPO / "src" / "mergesmith", tmp_path / "mergesmith")
    for built in (tmp_path / "mergesmith" / "native").glob("_kernels*"):
        built.unlink()
    return tmp_path


def test_version_says_when_the_kernels_are_not_built(package_copy: Path) -> None:
    line = version_line({"PYTHONPATH": str(package_copy)})
    assert "C kernels not built" in line and "pip install -e ." in line


@pytest.mark.skipif(shutil.which("cc") is None, reason="no C compiler")
def test_version_says_when_the_kernels_are_stale(package_copy: Path) -> None:
    """A library built from an older kernels.c (another ABI) is never called."""
    source = package_copy / "old.c"
    source.write_text("int ms_abi(void) { return 3; }\n")
    library = (
        package_copy / "mergesmith" / "native" / f"_kernels{sysconfig.get_config_var('EXT_SUFFIX')}"
    )
    subprocess.run(["cc", "-shared", "-fPIC", "-o", str(library), str(source)], check=True)
    line = version_line({"PYTHONPATH": str(package_copy)})
    assert "C kernels stale" in line and "version 3" in line and f"expects {ABI}" in line


@pytest.mark.skipif(shutil.which("cc") is None, reason="no C compiler")
@pytest.mark.parametrize("built_from", ["0123456789abcdef", None], ids=["other", "unsaid"])
def test_version_says_when_the_kernels_are_built_from_other_sources(
    package_copy: Path, built_from: str | None
) -> None:
    """The ABI matches, but the library was built from other sources (an editable install
    after a pull that changed kernels.c), or does not say what it was built from: stale too,
    or it would compute what the old sources said."""
    source = package_copy / "other.c"
    said = f'const char *ms_source_hash(void) {{ return "{built_from}"; }}\n'
    source.write_text(f"int ms_abi(void) {{ return {ABI}; }}\n" + (said if built_from else ""))
    library = (
        package_copy / "mergesmith" / "native" / f"_kernels{sysconfig.get_config_var('EXT_SUFFIX')}"
    )
    subprocess.run(["cc", "-shared", "-fPIC", "-o", str(library), str(source)], check=True)
    line = version_line({"PYTHONPATH": str(package_copy)})
    expected = source_hash(package_copy / "mergesmith" / "native")
    assert "C kernels stale" in line and "other kernel sources" in line
    assert f"({built_from or 'unknown'}) than these ({expected})" in line


def build_kernels(tmp_path: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    work = tmp_path / "checkout"
    work.mkdir()
    for name in ("setup.py", "pyproject.toml", "README.md"):
        shutil.copy(REPO / name, work / name)
    shutil.copytree(REPO / "src", work / "src")
    for built in (work / "src" / "mergesmith" / "native").glob("_kernels*"):
        built.unlink()
    return subprocess.run(
        [sys.executable, "setup.py", "-q", "build_ext", "--build-lib", str(tmp_path / "lib")],
        cwd=work,
        capture_output=True,
        text=True,
        env={**os.environ, "CC": "false", **env},
        timeout=300,
        check=False,
    )


def test_a_failed_kernel_build_stops_the_install_with_its_reason(tmp_path: Path) -> None:
    done = build_kernels(tmp_path, {})
    assert done.returncode != 0
    assert "the C kernels failed to build" in done.stderr
    assert "MERGESMITH_NO_KERNELS=1" in done.stderr


def test_no_kernels_installs_without_them_when_asked(tmp_path: Path) -> None:
    done = build_kernels(tmp_path, {"MERGESMITH_NO_KERNELS": "1"})
    assert done.returncode == 0, done.stderr
    assert "C kernels not built" in done.stdout
    assert not list((tmp_path / "lib").rglob("_kernels*"))
