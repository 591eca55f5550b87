"""``torchlens-edu vscode init``: writes, merges JSONC without losing anything, is idempotent,
and fails clearly where it cannot write."""

from __future__ import annotations

import json
import os
import re
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
    text = path.read_text("utf-8-sig").replace("\r\n", "\n")
    return [c["name"] for c in _jsonc.parse(text).plain()["configurations"]]


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
    edits = _jsonc.add_items(text, root.members["a"], [_jsonc.dumps(3)]) + _jsonc.add_members(
        text, root.members["b"], {"x": _jsonc.dumps(True)}) + _jsonc.add_members(
        text, root, {"c": _jsonc.dumps(None)})
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


def _vscode(tmp_path: Path, launch: bytes | str | None = None) -> Path:
    folder = tmp_path / ".vscode"
    folder.mkdir(exist_ok=True)
    if launch is not None:
        data = launch.encode() if isinstance(launch, str) else launch
        (folder / "launch.json").write_bytes(data)
    return folder


def _init(tmp_path: Path, capsys, *flags: str) -> tuple[int, str, str]:
    code = main(["vscode", "init", str(tmp_path), *flags])
    out, err = capsys.readouterr()
    return code, out, err


# --- issue 16 item 7: an empty file --------------------------------------------------------

@pytest.mark.parametrize("blank", ["", "  \n\t\n"])
def test_empty_or_blank_launch_json_gets_ours(tmp_path, capsys, blank):
    vscode = _vscode(tmp_path, blank)
    code, out, err = _init(tmp_path, capsys)
    assert code == 0, err
    assert (vscode / "launch.json").read_text() == template("launch.json")
    assert "was empty: written" in out
    assert _init(tmp_path, capsys)[0] == 0  # and the next run reads it
    assert not list(vscode.glob("*.bak*"))


# --- issue 16 item 8: links, read-only files, mode, BOM, CRLF ------------------------------

def test_a_symlinked_launch_json_is_edited_through_the_link(tmp_path, capsys):
    dotfiles = tmp_path / "dotfiles"
    dotfiles.mkdir()
    real = dotfiles / "launch.json"
    real.write_text(USER_LAUNCH)
    vscode = _vscode(tmp_path)
    (vscode / "launch.json").symlink_to(real)
    code, _, err = _init(tmp_path, capsys)
    assert code == 0, err
    assert (vscode / "launch.json").is_symlink()
    assert os.readlink(vscode / "launch.json") == str(real)
    assert "My training script" in _names(real) and set(_shipped_names()) <= set(_names(real))


def test_a_dangling_link_is_refused_and_left_alone(tmp_path, capsys):
    vscode = _vscode(tmp_path)
    (vscode / "launch.json").symlink_to(tmp_path / "gone.json")
    code, _, err = _init(tmp_path, capsys)
    assert code == 1 and "Traceback" not in err
    assert "launch.json is a link to" in err and "gone.json, which does not exist" in err
    assert "point the link at a file, or remove it" in err
    assert os.readlink(vscode / "launch.json") == str(tmp_path / "gone.json")
    assert not (tmp_path / "gone.json").exists()
    assert not (vscode / "settings.json").exists()  # refused before writing anything


def test_a_launch_json_folder_or_link_loop_is_refused(tmp_path, capsys):
    vscode = _vscode(tmp_path)
    (vscode / "launch.json").mkdir()
    code, _, err = _init(tmp_path, capsys)
    assert code == 1 and "launch.json is not a file; move it away" in err
    (vscode / "launch.json").rmdir()
    (vscode / "launch.json").symlink_to(vscode / "launch.json")
    code, _, err = _init(tmp_path, capsys)
    assert code == 1 and "launch.json is a link to" in err and "Traceback" not in err
    assert (vscode / "launch.json").is_symlink()


def test_a_read_only_launch_json_is_refused(tmp_path, capsys):
    vscode = _vscode(tmp_path, USER_LAUNCH)
    (vscode / "launch.json").chmod(0o444)
    code, _, err = _init(tmp_path, capsys)
    assert code == 1 and "Traceback" not in err
    assert "launch.json is read-only (mode 444)" in err and "chmod u+w" in err
    assert (vscode / "launch.json").read_text() == USER_LAUNCH
    assert (vscode / "launch.json").stat().st_mode & 0o777 == 0o444


def test_a_read_only_file_that_needs_no_change_is_fine(tmp_path, capsys):
    vscode = _vscode(tmp_path, template("launch.json"))
    (vscode / "launch.json").chmod(0o444)
    code, out, err = _init(tmp_path, capsys)
    assert code == 0, err
    assert "launch.json unchanged" in out


def test_mode_bom_and_crlf_are_kept(tmp_path, capsys):
    original = "\ufeff" + USER_LAUNCH.replace("\n", "\r\n")
    vscode = _vscode(tmp_path, original.encode())
    (vscode / "launch.json").chmod(0o640)
    code, _, err = _init(tmp_path, capsys)
    assert code == 0, err
    data = (vscode / "launch.json").read_bytes()
    assert data.startswith(b"\xef\xbb\xbf") and data.count(b"\n") == data.count(b"\r\n")
    assert (vscode / "launch.json").stat().st_mode & 0o777 == 0o640
    text = data.decode("utf-8-sig").replace("\r\n", "\n")
    assert text.startswith(USER_LAUNCH.rsplit("    ],", 1)[0])  # the user's part, untouched
    assert set(_shipped_names()) <= set(_names(vscode / "launch.json"))


def test_new_files_get_the_usual_mode(tmp_path, capsys):
    old_mask = os.umask(0o022)
    try:
        assert _init(tmp_path, capsys)[0] == 0
    finally:
        os.umask(old_mask)
    for name in ("launch.json", "settings.json"):
        assert (tmp_path / ".vscode" / name).stat().st_mode & 0o777 == 0o644


def test_a_failed_write_leaves_the_old_file_whole(tmp_path, capsys, monkeypatch):
    vscode = _vscode(tmp_path, USER_LAUNCH)

    def crash(src, dst):
        raise OSError(28, "No space left on device", str(dst))

    monkeypatch.setattr(os, "replace", crash)
    code, _, err = _init(tmp_path, capsys)
    assert code == 1 and "No space left on device" in err and "Traceback" not in err
    assert (vscode / "launch.json").read_text() == USER_LAUNCH
    assert sorted(p.name for p in vscode.iterdir()) == ["launch.json"]  # no temp file left


# --- issue 16 item 9: backups ----------------------------------------------------------------

def test_backups_are_exact_and_never_overwritten(tmp_path, capsys):
    broken = b"\xef\xbb\xbf{\"configurations\": [ {\"name\": } ]}\r\n"
    vscode = _vscode(tmp_path, broken)
    (vscode / "launch.json.bak").write_text("the user's own backup")
    code, out, err = _init(tmp_path, capsys, "--force")
    assert code == 0, err
    assert (vscode / "launch.json.bak").read_text() == "the user's own backup"
    assert (vscode / "launch.json.bak.1").read_bytes() == broken  # byte for byte
    assert "yours is saved in launch.json.bak.1" in out
    (vscode / "launch.json").write_bytes(b"{oops")
    assert _init(tmp_path, capsys, "--force")[0] == 0
    assert (vscode / "launch.json.bak.1").read_bytes() == broken
    assert (vscode / "launch.json.bak.2").read_bytes() == b"{oops"


def test_force_saves_a_changed_configuration_of_ours_first(tmp_path, capsys):
    vscode = _vscode(tmp_path, USER_LAUNCH)
    (vscode / "settings.json").write_text('{"debug.inlineValues": "off"}')
    code, out, err = _init(tmp_path, capsys, "--force")
    assert code == 0, err
    assert (vscode / "launch.json.bak").read_text() == USER_LAUNCH
    assert (vscode / "settings.json.bak").read_text() == '{"debug.inlineValues": "off"}'
    assert ("replaced your configuration 'GPT-2: stop inside attention (CPU)' (--force; yours "
            "is saved in launch.json.bak)") in out
    assert _init(tmp_path, capsys, "--force")[0] == 0  # nothing to replace: no new backup
    assert not (vscode / "launch.json.bak.1").exists()


def test_without_force_nothing_is_backed_up(tmp_path, capsys):
    vscode = _vscode(tmp_path, USER_LAUNCH)
    code, out, _ = _init(tmp_path, capsys)
    assert code == 0 and "--force replaces it, saving yours first" in out
    assert not list(vscode.glob("*.bak*"))


@pytest.mark.parametrize("key", ["configurations", "inputs"])
def test_a_member_that_is_not_a_list_suggests_force_and_force_works(tmp_path, capsys, key):
    text = '{"version": "0.2.0", "' + key + '": {"mine": 1}}'
    vscode = _vscode(tmp_path, text)
    code, _, err = _init(tmp_path, capsys)
    assert code == 1
    assert f'launch.json: "{key}" should be a list [...]; fix it, or use --force' in err
    code, out, err = _init(tmp_path, capsys, "--force")
    assert code == 0, err
    assert f'replaced "{key}" (it was not a list)' in out
    assert (vscode / "launch.json.bak").read_text() == text
    launch = _jsonc.parse((vscode / "launch.json").read_text()).plain()
    assert launch[key] == _jsonc.parse(template("launch.json")).plain()[key]


def test_deep_nesting_is_a_clear_error(tmp_path, capsys):
    deep = "[" * 5000 + "]" * 5000
    with pytest.raises(_jsonc.JSONCError, match="line 1, column 101: nested more than 100"):
        _jsonc.parse(deep)
    vscode = _vscode(tmp_path, '{"configurations": ' + deep + "}")
    code, _, err = _init(tmp_path, capsys)
    assert code == 1 and "RecursionError" not in err and "Traceback" not in err
    assert "nested more than 100 levels deep" in err and "--force" in err
    assert _init(tmp_path, capsys, "--force")[0] == 0
    assert _names(vscode / "launch.json") == _shipped_names()


def test_a_file_that_is_not_utf8_is_a_clear_error(tmp_path, capsys):
    _vscode(tmp_path, b'{"version": "\xff"}')
    code, _, err = _init(tmp_path, capsys)
    assert code == 1 and "it is not UTF-8 text" in err


# --- issue 17 item 11: the user's indentation, our comments ---------------------------------

@pytest.mark.parametrize("unit", ["    ", "\t"])
def test_merge_keeps_the_files_indentation_and_our_comments(tmp_path, capsys, unit):
    user = USER_LAUNCH.replace("    ", unit)
    vscode = _vscode(tmp_path, user)
    assert _init(tmp_path, capsys)[0] == 0
    merged = (vscode / "launch.json").read_text()
    assert _jsonc.parse(merged)  # still valid
    # our GPU configuration, with its comment, at the user's item and member depth
    assert (f"{unit * 2}{{\n{unit * 3}// The same stop on a GPU; asks which one."
            in merged)
    assert f'\n{unit * 3}"name": "GPT-2: stop inside attention (GPU)",\n' in merged
    assert f'\n{unit}"inputs": [\n{unit * 2}{{\n{unit * 3}"id": "gpuDevice",' in merged
    for line in merged.splitlines():  # no 2-space step anywhere
        lead = line[: len(line) - len(line.lstrip())]
        assert lead.replace(unit, "") in ("", " "), repr(line)  # " ": the user's aligned line


def test_settings_merge_keeps_our_trailing_comments(tmp_path, capsys):
    vscode = _vscode(tmp_path)
    (vscode / "settings.json").write_text('{\n    "editor.tabSize": 4\n}\n')
    assert _init(tmp_path, capsys)[0] == 0
    settings = (vscode / "settings.json").read_text()
    assert ('    "debug.inlineValues": "on",  // values next to each line while you step\n'
            in settings)
    assert settings.endswith('    "debugpy.debugJustMyCode": false  // step into torch and '
                             'torchlens_edu when you want to\n}\n')
    assert _jsonc.parse(settings).plain()["editor.tabSize"] == 4


@pytest.mark.parametrize("width", [60, 80, 120])
def test_printed_launch_json_is_valid_jsonc(width):
    """Lesson 05 prints the file: copied from a terminal, it must still parse."""
    from rich.console import Console
    from rich.syntax import Syntax

    from torchlens_edu.commands.vscode import printable

    console = Console(width=width, no_color=True, force_terminal=False)
    with console.capture() as shown:
        console.print(Syntax(printable("launch.json", width), "json", theme="ansi_dark"),
                      soft_wrap=True)
    lines = shown.get().splitlines()
    too_long = [line for line in lines if len(line) > width]
    assert all(re.fullmatch(r'\s*"[^"]*",?', line) for line in too_long)  # one string: no break
    assert width < 80 or not too_long
    assert _jsonc.parse("\n".join(lines)).plain() == _jsonc.parse(template("launch.json")).plain()
    comments = [line.strip() for line in template("launch.json").splitlines()
                if line.strip().startswith("//")]
    wrapped = len([line for line in lines if line.strip().startswith("//")])
    assert wrapped > len(comments) if width < 100 else wrapped == len(comments)


@pytest.mark.slow
def test_lesson_05_prints_launch_json_that_parses(tmp_path):
    import subprocess
    import sys

    root = Path(__file__).parents[1]
    env = {k: v for k, v in os.environ.items() if not k.startswith("TORCHLENS_EDU_")}
    env.update(COLUMNS="80", HF_HUB_OFFLINE="1", HF_HUB_CACHE=str(tmp_path),
               PYTHONPATH=os.pathsep.join(p for p in (str(root), env.get("PYTHONPATH")) if p))
    done = subprocess.run([sys.executable, str(root / "demos" / "05_attention_in_vscode.py")],
                          env=env, capture_output=True, text=True, timeout=300,
                          stdin=subprocess.DEVNULL)
    assert done.returncode == 0, done.stderr
    section = done.stdout.split("1. the launch configurations")[1].split("2. the stop point")[0]
    printed = section.split("\n", 1)[1].rsplit("\n", 1)[0]  # between the two rules
    assert _jsonc.parse(printed).plain() == _jsonc.parse(template("launch.json")).plain()
