"""``torchlens-edu vscode init``: writes, merges JSONC without losing anything, is idempotent,
and fails clearly where it cannot write."""

from __future__ import annotations

import json
import os
import zipfile
from pathlib import Path

import pytest

from torchlens_edu._core import jsonc as _jsonc
from torchlens_edu.cli import main
from torchlens_edu.commands.vscode import init, template

USER_LAUNCH = """{
    // my own configurations
    "version": "0.2.0",
    "configurations": [
        {
            "name": "My training script",  // keep me
            "type": "debugpy",
            "request": "launch",
            "program": "${workspaceFolder}/train.py",
        },
        /* a block comment */
        {"name": "GPT-2: stop inside attention (CPU)", "type": "debugpy", "request": "launch",
         "module": "torchlens_edu.cli", "args": ["debug", "--device", "cpu"]},
    ],
}
"""


def _names(path: Path) -> list[str]:
    return [c["name"] for c in _jsonc.parse(path.read_text()).plain()["configurations"]]


def _shipped_names() -> list[str]:
    return [c["name"] for c in _jsonc.parse(template("launch.json")).plain()["configurations"]]


def test_empty_folder_gets_the_shipped_files(tmp_path, capsys):
    assert main(["vscode", "init", str(tmp_path)]) == 0
    launch = tmp_path / ".vscode" / "launch.json"
    assert launch.read_text() == template("launch.json")  # comments included
    assert (tmp_path / ".vscode" / "settings.json").read_text() == template("settings.json")
    assert "wrote" in capsys.readouterr().out
    names = _shipped_names()
    assert any("attention" in n and "CPU" in n for n in names)
    assert any("attention" in n and "GPU" in n for n in names)
    assert {"Debug current file with torchlens_edu print options",
            "Attach to a process on 127.0.0.1:5678",
            "Debug the current test (pytest)"} <= set(names)


def test_shipped_configurations_follow_the_rules():
    launch = _jsonc.parse(template("launch.json")).plain()
    for config in launch["configurations"]:
        assert config["type"] == "debugpy"
        if config["request"] == "launch":
            assert "-Xfrozen_modules=off" in config["pythonArgs"]
            assert config["env"]["TORCHLENS_EDU_PRINT"] == "edu"
    attention = [c for c in launch["configurations"] if "attention" in c["name"]]
    assert all(c["justMyCode"] is False and c["env"]["TORCHLENS_EDU_STOP"].startswith("attention")
               for c in attention)
    pytest_config = next(c for c in launch["configurations"] if c.get("module") == "pytest")
    assert "--tle-print=edu" in pytest_config["args"]
    assert launch["inputs"][0]["id"] == "gpuDevice"
    assert json.loads(json.dumps(_jsonc.parse(template("settings.json")).plain()))


def test_merge_keeps_user_configurations_and_comments(tmp_path):
    vscode = tmp_path / ".vscode"
    vscode.mkdir()
    (vscode / "launch.json").write_text(USER_LAUNCH)
    (vscode / "settings.json").write_text('{\n  // mine\n  "debug.inlineValues": "off",\n}\n')
    plans = init(tmp_path)
    launch = (vscode / "launch.json").read_text()
    assert "// my own configurations" in launch and "/* a block comment */" in launch
    assert "// keep me" in launch
    names = _names(vscode / "launch.json")
    assert names[0] == "My training script"
    assert sorted(set(names)) == sorted({"My training script", *_shipped_names()})
    assert len(names) == len(set(names))  # our CPU configuration is not duplicated
    assert any("kept your configuration 'GPT-2: stop inside attention (CPU)'" in n
               for n in plans[0].notes)
    settings = _jsonc.parse((vscode / "settings.json").read_text()).plain()
    assert settings["debug.inlineValues"] == "off"  # the user's value wins
    assert settings["python.testing.pytestEnabled"] is True
    assert "// mine" in (vscode / "settings.json").read_text()


def test_merge_is_idempotent_and_force_replaces_ours(tmp_path):
    vscode = tmp_path / ".vscode"
    vscode.mkdir()
    (vscode / "launch.json").write_text(USER_LAUNCH)
    init(tmp_path)
    once = (vscode / "launch.json").read_text()
    plans = init(tmp_path)
    assert (vscode / "launch.json").read_text() == once and not any(p.changed for p in plans)
    init(tmp_path, force=True)
    configs = _jsonc.parse((vscode / "launch.json").read_text()).plain()["configurations"]
    cpu = next(c for c in configs if c["name"] == "GPT-2: stop inside attention (CPU)")
    assert cpu["justMyCode"] is False  # ours now, not the user's older copy
    assert configs[0]["name"] == "My training script"


def test_dry_run_writes_nothing(tmp_path, capsys):
    assert main(["vscode", "init", str(tmp_path), "--dry-run"]) == 0
    assert not (tmp_path / ".vscode").exists()
    assert "would write" in capsys.readouterr().out


def test_unreadable_launch_json_is_an_error_unless_forced(tmp_path, capsys):
    vscode = tmp_path / ".vscode"
    vscode.mkdir()
    (vscode / "launch.json").write_text('{"configurations": [ {"name": } ]}')
    assert main(["vscode", "init", str(tmp_path)]) == 1
    assert "line 1, column" in capsys.readouterr().err
    assert main(["vscode", "init", str(tmp_path), "--force"]) == 0
    assert (vscode / "launch.json.bak").read_text().startswith('{"configurations"')
    assert _names(vscode / "launch.json") == _shipped_names()


def test_target_that_is_a_file_is_a_clear_error(tmp_path, capsys):
    target = tmp_path / "notes.txt"
    target.write_text("not a folder")
    assert main(["vscode", "init", str(target)]) == 1
    assert "is a file, not a folder" in capsys.readouterr().err
    (tmp_path / ".vscode").write_text("a file where the folder should be")
    assert main(["vscode", "init", str(tmp_path)]) == 1
    assert "is a file" in capsys.readouterr().err


def _read_only_folder(tmp_path: Path) -> Path:
    """A folder this process cannot write into: chmod works for normal users; root ignores
    it, so there we need a read-only file system (a container's /sys or /proc)."""
    if os.geteuid() != 0:
        folder = tmp_path / "locked"
        folder.mkdir()
        folder.chmod(0o555)
        return folder
    for candidate in ("/sys", "/proc/self"):
        if os.path.isdir(candidate) and os.statvfs(candidate).f_flag & os.ST_RDONLY:
            return Path(candidate)  # nothing gets written: creating .vscode there fails
    pytest.skip("running as root without a read-only file system: chmod cannot block writes")


def test_read_only_folder_is_a_clear_error(tmp_path, capsys):
    folder = _read_only_folder(tmp_path)
    try:
        assert main(["vscode", "init", str(folder)]) == 1
    finally:
        if folder.parent == tmp_path:
            folder.chmod(0o755)
    err = capsys.readouterr().err
    assert "cannot write to" in err and "Traceback" not in err
    assert not (folder / ".vscode").exists()


def test_permission_denied_while_writing_is_a_clear_error(tmp_path, capsys, monkeypatch):
    """The same error path wherever the refusal comes from (root passes chmod checks)."""
    import tempfile

    def refuse(*args, dir=None, **kwargs):
        raise PermissionError(13, "Permission denied", str(dir))

    monkeypatch.setattr(tempfile, "mkstemp", refuse)
    assert main(["vscode", "init", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert "cannot write to" in err and "Permission denied" in err and "Traceback" not in err
    assert not (tmp_path / ".vscode" / "launch.json").exists()


def test_jsonc_edits_keep_everything_else():
    text = '{\n  "a": [1, 2], // two\n  "b": {}\n}\n'
    root = _jsonc.parse(text)
    edits = _jsonc.add_items(text, root.members["a"], [3]) + _jsonc.add_members(
        text, root.members["b"], {"x": True}) + _jsonc.add_members(text, root, {"c": None})
    merged = _jsonc.apply(text, edits)
    assert "// two" in merged
    assert _jsonc.parse(merged).plain() == {"a": [1, 2, 3], "b": {"x": True}, "c": None}
    with pytest.raises(_jsonc.JSONCError, match="line 2, column 5"):
        _jsonc.parse('{"a":\n  1 2}')


@pytest.mark.slow
def test_wheel_ships_vscode_files_and_the_debugger_plugin(tmp_path):
    """Build the wheel (no network, no isolation: setuptools is here) and look inside."""
    import subprocess
    import sys

    root = Path(__file__).parents[1]
    subprocess.run([sys.executable, "-m", "pip", "wheel", str(root), "--no-deps",
                    "--no-build-isolation", "-q", "-w", str(tmp_path)],
                   check=True, timeout=300, capture_output=True)
    wheel = next(tmp_path.glob("torchlens_edu-*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    assert {"torchlens_edu/data/vscode/launch.json", "torchlens_edu/data/vscode/settings.json",
            "pydevd_plugins/extensions/pydevd_plugin_torchlens_edu.py"} <= names


def test_a_configurations_member_that_is_not_a_list_is_a_clear_error(tmp_path):
    from torchlens_edu.commands.vscode import plan_launch

    target = tmp_path / "launch.json"
    with pytest.raises(ValueError, match=r"launch\.json: \"configurations\" should be a list"):
        plan_launch(target, '{"version": "0.2.0", "configurations": {}}', force=False)
