"""What a fresh machine gets: nothing in the repository shadows an installed package, setuptools packages every
subpackage and data file, `zo2 --help` imports nothing heavy, CI runs the README's test command as written, and
(slow) a wheel installed into a new environment runs `zo2 launch` and `zo2 slurm` from another folder."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import venv
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SOURCE_ROOTS = {"zo2": REPO / "zo2", "zo2_kernels": REPO / "kernels" / "zo2_kernels",
                "zo2_launcher": REPO / "launcher" / "zo2_launcher"}
"""Each importable top-level package and the folder it is built from."""
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


def _tracked_top_level() -> list[Path]:
    out = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True)
    if out.returncode != 0:
        pytest.skip("not a git checkout")
    return sorted({REPO / line.split("/", 1)[0] for line in out.stdout.splitlines()})


def test_no_top_level_folder_or_module_is_importable_under_a_generic_name():
    """The repository root is on sys.path whenever Python runs from it: a top-level package folder (`kernels/`,
    `launcher/`, `tests/`...) or module would shadow an installed package of that name."""
    offenders = []
    for path in _tracked_top_level():
        if path.name == "zo2" or path.name.startswith("zo2_"):
            continue  # the project's own import names
        if path.is_dir() and not path.name.startswith(".") and (path / "__init__.py").exists():
            offenders.append(f"{path.name}/__init__.py")
        if path.is_file() and path.suffix == ".py":
            offenders.append(path.name)
    assert not offenders, f"importable from the repository root under a generic name: {offenders}"


def test_no_script_folder_shadows_an_installed_or_standard_module():
    """Python puts a script's own folder first on sys.path: a benchmark named peft.py or kernels.py there would be
    imported instead of the peft or kernels package (transformers imports the latter)."""
    import importlib.metadata as metadata

    taken = set(metadata.packages_distributions()) | set(sys.stdlib_module_names)
    folders = [REPO, *(p for p in REPO.rglob("*") if p.is_dir() and not any(
        part.startswith(".") or part == "__pycache__" or part.endswith(".egg-info") for part in p.parts))]
    clashes = [str(f.relative_to(REPO) / m.name) for f in folders for m in f.glob("*.py")
               if m.stem in taken and not (f / "__init__.py").exists()]
    assert not clashes, f"script folders hold modules named like installed or standard modules: {clashes}"


def test_installed_kernels_package_wins_from_the_repository_root():
    """transformers >= 5.25 imports Hugging Face's `kernels` package; the repository's kernels/ folder must not
    shadow it when Python runs from the root (python -m pytest, scripts, zo2 launch's workers)."""
    code = ("import importlib.metadata as m, transformers.modeling_utils, zo2, zo2_kernels, kernels, json; "
            "print(json.dumps({'kernels': getattr(kernels, '__file__', None), 'dist': m.version('kernels')}))")
    try:
        import importlib.metadata as metadata

        metadata.version("kernels")
    except Exception:
        pytest.skip("Hugging Face's `kernels` package is not installed (transformers < 5.25 does not need it)")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, env=ENV,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    found = json.loads(out.stdout.strip().splitlines()[-1])
    assert found["kernels"] is not None and not Path(found["kernels"]).resolve().is_relative_to(REPO), found


def _setuptools_packages() -> tuple[list[str], dict[str, str], dict[str, list[str]]]:
    """(packages, package_dir, package_data) as setuptools expands pyproject.toml."""
    config = pytest.importorskip("setuptools.config.pyprojecttoml")
    cwd = os.getcwd()
    try:
        os.chdir(REPO)
        tool = config.read_configuration(REPO / "pyproject.toml", expand=True)["tool"]["setuptools"]
    finally:
        os.chdir(cwd)
    return tool["packages"], tool.get("package-dir", {}), tool.get("package-data", {})


def _source_packages() -> dict[str, Path]:
    """Every folder holding Python files under zo2/, kernels/ and launcher/, by its dotted package name."""
    found = {}
    for top, root in SOURCE_ROOTS.items():
        for folder in [root, *(p for p in root.rglob("*") if p.is_dir())]:
            if folder.name == "__pycache__" or not any(folder.glob("*.py")):
                continue
            found[".".join([top, *folder.relative_to(root).parts])] = folder
    for folder in (REPO / "kernels", REPO / "launcher"):  # anything beside the package would not ship
        stray = [p.name for p in folder.iterdir() if p.suffix == ".py"]
        assert not stray, f"{folder.name}/ holds modules outside its package: {stray}"
    return found


def test_setuptools_packages_every_source_folder_and_data_file():
    packages, package_dir, package_data = _setuptools_packages()
    source = _source_packages()
    assert sorted(packages) == sorted(source), ("pyproject.toml's package discovery and the source tree differ: "
                                                f"missing {sorted(set(source) - set(packages))}, "
                                                f"extra {sorted(set(packages) - set(source))}")
    for name, folder in source.items():
        assert (folder / "__init__.py").is_file(), f"{name} has no __init__.py"
    for top in ("zo2_kernels", "zo2_launcher"):
        assert (REPO / package_dir[top]).resolve() == SOURCE_ROOTS[top].resolve()
    # every data file inside a package (not Python, not a folder README) matches that package's package-data
    from fnmatch import fnmatch

    for name, folder in source.items():
        for path in folder.iterdir():
            if path.is_dir() or path.suffix in (".py", ".pyc") or path.name == "README.md":
                continue
            patterns = package_data.get(name, [])
            assert any(fnmatch(path.name, p) for p in patterns), f"{name}/{path.name} would not be packaged"


def test_sbatch_template_is_package_data_linked_to_deploy():
    from zo2_launcher import slurm

    assert slurm.TEMPLATE_PATH.is_file()
    assert slurm.TEMPLATE_PATH.read_text() == (REPO / "deploy" / "slurm" / "zo2.sbatch.template").read_text()


def test_help_imports_nothing_heavy():
    """`zo2 --help` and every `zo2 <command> --help` answer without importing torch, transformers or zo2."""
    code = ("import sys, contextlib, io\n"
            "from zo2_launcher.cli import build_parser, main\n"
            "commands = [[]] + [[c] for c in ('train', 'replay', 'plan', 'eval', 'completion', 'launch', 'slurm')]\n"
            "for cmd in commands:\n"
            "    with contextlib.redirect_stdout(io.StringIO()) as out:\n"
            "        try:\n"
            "            main([*cmd, '--help'])\n"
            "        except SystemExit as e:\n"
            "            assert e.code == 0, (cmd, e.code)\n"
            "    assert 'usage: zo2' in out.getvalue(), cmd\n"
            "heavy = sorted(m for m in ('torch', 'transformers', 'zo2', 'numpy') if m in sys.modules)\n"
            "print(heavy)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=ENV, timeout=120,
                         cwd=REPO)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "[]", f"--help imported {out.stdout.strip()}"


def _readme_test_command() -> str:
    readme = (REPO / "README.md").read_text()
    blocks = re.findall(r"```bash\n(.*?)```", readme, re.S)
    commands = [line for block in blocks for line in block.splitlines() if "pytest" in line and "pip install" in line]
    assert len(commands) == 1, f"the README should show one install-and-test command, found {commands}"
    return commands[0].strip()


def test_ci_runs_the_readme_test_command_in_a_new_environment():
    script = (REPO / ".ci" / "run").read_text()
    lines = [line.strip() for line in script.splitlines() if line.strip() and not line.strip().startswith("#")]
    assert _readme_test_command() in lines, "'.ci/run' must run the README's test command exactly as written"
    at = lines.index(_readme_test_command())
    before = "\n".join(lines[:at])
    assert "mktemp -d" in before and "-m venv" in before and "activate" in before, \
        ".ci/run must create and activate a new virtual environment before the test command"
    assert re.search(r"trap .*rm -rf", before), ".ci/run must remove its environment afterwards"


def test_constraints_pin_every_dependency_exactly():
    """Each install path resolves to the versions the suite passed with: every requirement of zo2 and of its
    test/peft/trainer extras is pinned with == in constraints/common.txt or the torch lines."""
    from importlib.metadata import requires

    pins = {}
    for name in ("common.txt", "cpu.txt", "gpu.txt"):
        for line in (REPO / "constraints" / name).read_text().splitlines():
            line = line.split("#", 1)[0].strip()
            if line and not line.startswith("-c"):
                pkg, _, version = line.partition("==")
                assert version, f"constraints/{name}: {line!r} is not an exact pin"
                pins.setdefault(name, {})[re.sub(r"[-_.]+", "-", pkg.lower())] = version
    for torch_file in ("cpu.txt", "gpu.txt"):
        assert set(pins[torch_file]) == {"torch", "triton"}, torch_file
        assert "-c common.txt" in (REPO / "constraints" / torch_file).read_text()
    pinned = set(pins["common.txt"]) | set(pins["cpu.txt"])
    wanted = set()
    for req in requires("zo2") or []:
        name, _, marker = req.partition(";")
        if "python_version <" in marker:
            continue
        extra = re.search(r'extra == "([^"]+)"', marker)
        if extra and extra.group(1) not in ("test", "peft", "trainer", "kernels", "deepspeed", "nvme"):
            continue
        wanted.add(re.sub(r"[-_.]+", "-", re.split(r"[<>=!~\[ ]", name.strip(), maxsplit=1)[0].lower()))
    assert wanted - pinned == set(), f"not pinned in constraints/: {sorted(wanted - pinned)}"


def _scratch_env(path: Path) -> Path:
    """A new virtual environment that sees this environment's packages (but not its editable zo2) through a .pth
    line, so the wheel under test is the only zo2 there and nothing is downloaded."""
    venv.EnvBuilder(with_pip=False).create(path)
    python = path / "bin" / "python"
    site = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    ours = [p for p in sys.path if p.endswith("site-packages") and Path(p).is_dir()]
    (Path(site) / "outer.pth").write_text("\n".join(ours) + "\n")
    return python


@pytest.mark.slow
def test_wheel_installs_and_runs_from_another_folder(tmp_path):
    """The wheel holds every subpackage and the sbatch template: installed into a scratch environment it runs
    `zo2 launch --nproc-per-node 1` for a few steps and `zo2 slurm --dry-run` from a folder outside the checkout."""
    pytest.importorskip("setuptools")
    dist = tmp_path / "dist"
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                            "-w", str(dist), str(REPO)], capture_output=True, text=True, timeout=600)
    assert build.returncode == 0, build.stderr[-3000:]
    wheel = next(dist.glob("zo2-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    for package in _source_packages():
        assert f"{package.replace('.', '/')}/__init__.py" in names, f"the wheel lacks {package}"
    assert "zo2_launcher/zo2.sbatch.template" in names and "zo2/data/tiny_corpus.jsonl" in names

    python = _scratch_env(tmp_path / "venv")
    site = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    with zipfile.ZipFile(wheel) as zf:  # a wheel install is an unzip into site-packages (+ the console script)
        zf.extractall(site)
    work = tmp_path / "elsewhere"
    work.mkdir()
    where = subprocess.run([str(python), "-c", "import zo2, zo2.control, zo2_kernels, zo2_launcher; "
                            "print(zo2.__file__); print(zo2_kernels.__file__)"],
                           cwd=work, capture_output=True, text=True, env=ENV, timeout=300)
    assert where.returncode == 0, where.stderr[-2000:]
    assert all(line.startswith(site) for line in where.stdout.split()), where.stdout
    zo2 = [str(python), "-m", "zo2_launcher"]
    launch = subprocess.run(
        [*zo2, "launch", "--nproc-per-node", "1", "--", "--quiet", "--out", "run", "--set", "train.steps=3",
         "--set", "train.eval_batches=0", "--set", "run.plot=false", "--set", "data.max_length=32",
         "--set", "checkpoint.save_every=0"],
        cwd=work, capture_output=True, text=True, env=ENV, timeout=600)
    assert launch.returncode == 0, launch.stdout[-2000:] + launch.stderr[-3000:]
    from zo2.train.checkpoint import read_log

    assert [r["step"] for r in read_log(work / "run" / "trajectory.jsonl")] == [0, 1, 2]
    job = work / "job.toml"
    job.write_text('[run]\nout_dir = "runs/slurm"\n[parallel]\ndp = 2\n')
    slurm = subprocess.run([*zo2, "slurm", str(job), "--nodes", "1", "--gpus-per-node", "2", "--dry-run"],
                           cwd=work, capture_output=True, text=True, env=ENV, timeout=300)
    assert slurm.returncode == 0, slurm.stderr[-2000:]
    assert "#SBATCH --nodes=1" in slurm.stdout and "zo2 launch" in slurm.stdout


def test_every_documented_editable_install_uses_the_pinned_constraints():
    """The README's install commands and the Dockerfile's resolve through constraints/ (torch, transformers and
    the rest at the versions the suite passed with)."""
    readme = (REPO / "README.md").read_text()
    commands = re.findall(r"pip install [^`\n]*-e [^`\n]*", readme)
    assert len(commands) >= 3
    for command in commands:
        assert re.search(r"-c constraints/(cpu|gpu)\.txt", command), f"README: {command!r} is not pinned"
    docker = (REPO / "deploy" / "Dockerfile").read_text()
    assert "COPY constraints constraints" in docker
    assert re.search(r"RUN pip install -c constraints/gpu\.txt -e", docker)


def test_the_design_the_code_cites_is_in_the_repository():
    """Docstrings and docs cite "DESIGN.md §N": the file is part of the repository and has every cited section."""
    design = (REPO / "DESIGN.md").read_text()
    sections = set(re.findall(r"^## (\d+)\.", design, re.M))
    cited = set()
    for folder in ("zo2", "kernels", "launcher", "benchmarks", "deploy"):
        for path in (REPO / folder).rglob("*"):
            if path.suffix in (".py", ".md", ".sh", ".toml") and "__pycache__" not in path.parts:
                cited |= set(re.findall(r"DESIGN\.md[^§\n]{0,12}§\s*(\d+)", path.read_text(errors="ignore")))
    cited |= set(re.findall(r"DESIGN\.md[^§\n]{0,12}§\s*(\d+)", (REPO / "README.md").read_text()))
    assert cited and cited <= sections, f"cited sections missing from DESIGN.md: {sorted(cited - sections)}"
