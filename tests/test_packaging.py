"""The wheel a user installs: built from the project's files, offline, and opened as pip would."""

import shutil
import subprocess
import sys
import zipfile
from email.parser import Parser
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_the_wheel_carries_the_licences_and_the_sample_photos(tmp_path):
    source = tmp_path / "source"
    source.mkdir()
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy(ROOT / name, source / name)
    shutil.copytree(ROOT / "sktransfer", source / "sktransfer", ignore=shutil.ignore_patterns("__pycache__"))
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                            "--no-index", "-w", str(tmp_path / "dist"), str(source)],
                           capture_output=True, text=True, timeout=600)
    assert built.returncode == 0, built.stdout[-2000:] + built.stderr[-2000:]
    (wheel,) = (tmp_path / "dist").glob("sktransfer-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        info = next(n.rsplit("/", 1)[0] for n in names if n.endswith(".dist-info/METADATA"))
        metadata = Parser().parsestr(archive.read(f"{info}/METADATA").decode())
        licence = archive.read(f"{info}/licenses/LICENSE").decode()
    assert metadata["License-Expression"] == "BSD-3-Clause AND MIT"
    assert "BSD 3-Clause License" in licence
    assert f"{info}/licenses/sktransfer/data/trash_sample/ATTRIBUTION.md" in names  # the photos' MIT notice
    photos = [n for n in names if n.startswith("sktransfer/data/trash_sample/") and n.endswith(".jpg")]
    assert len(photos) == 180
    assert "sktransfer/__init__.pyi" in names  # the public names, which the package loads from it


def test_public_names_load_on_first_use():
    """`import sktransfer` is quick (torch loads when a name that needs it is first used),
    and every public name is there for `from sktransfer import ...`, `*` and dir()."""
    code = ("import sys, sktransfer\n"
            "print('torch' in sys.modules)\n"
            "from sktransfer import *\n"
            "print(sorted(set(sktransfer.__all__) - set(dir(sktransfer))), "
            "sorted(n for n in sktransfer.__all__ if n not in globals()))\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["False", "[]", "[]"]

    import ast

    import sktransfer

    stub = ast.parse((ROOT / "sktransfer" / "__init__.pyi").read_text())
    listed = next(node.value for node in stub.body if isinstance(node, ast.Assign)
                  and node.targets[0].id == "__all__")
    assert sorted(ast.literal_eval(listed)) == sorted(sktransfer.__all__)  # the stub's __all__, for tools
    for name in sktransfer.__all__:
        value = getattr(sktransfer, name)
        assert value.__module__.startswith("sktransfer._") and value.__name__ == name
    try:
        sktransfer.PretrainedImageClasifier
    except AttributeError as e:
        assert "PretrainedImageClasifier" in str(e)
    else:
        raise AssertionError("a misspelt name was found")
