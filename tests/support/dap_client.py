"""A small Debug Adapter Protocol client: drives debugpy the way VS Code does, headless.

JSON messages with ``Content-Length`` framing, over the adapter's stdio (``python -m
debugpy.adapter``, as VS Code launches it) or over TCP (attaching to ``debugpy.listen``).
Handles the adapter's ``runInTerminal`` request like VS Code's integrated terminal does, by
starting the process itself (stdin closed, output kept in ``.terminal_output``).

Everything waits with a timeout and :meth:`DAPClient.close` kills whatever it started: a
broken debugger fails a test, it never hangs it.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

TIMEOUT = 60.0  # seconds for any one answer; generous for 2 busy CPU cores
_VARIABLE = re.compile(r"\$\{([^}]+)\}")


class DAPError(AssertionError):
    """The adapter refused a request, or an answer did not come in time."""


def substitute(config: Any, variables: dict[str, str]) -> Any:
    """Replace VS Code's ``${workspaceFolder}``, ``${file}``, ``${input:x}``, ``${env:X}``.

    >>> substitute({"args": ["${file}"]}, {"file": "a.py"})
    {'args': ['a.py']}
    """
    if isinstance(config, dict):
        return {k: substitute(v, variables) for k, v in config.items()}
    if isinstance(config, list):
        return [substitute(v, variables) for v in config]
    if not isinstance(config, str):
        return config

    def one(match: re.Match) -> str:
        name = match.group(1)
        if name.startswith("env:"):
            return os.environ.get(name[4:], "")
        if name not in variables:
            raise KeyError(f"no value for ${{{name}}} in this test")
        return variables[name]

    return _VARIABLE.sub(one, config)


def as_vscode_would(config: dict[str, Any], workspace: str) -> dict[str, Any]:
    """What the Python Debugger extension adds before sending a launch configuration: the
    selected interpreter and the workspace folder as the default working directory."""
    config = dict(config)
    if config.get("request") == "launch":
        config.setdefault("python", [sys.executable])
        config.setdefault("cwd", workspace)
    return config


class DAPClient:
    """One debug session. Use :meth:`launch_adapter` or :meth:`connect`, then requests."""

    def __init__(self, reader: BinaryIO, writer: BinaryIO, *, adapter: Any = None,
                 sock: socket.socket | None = None) -> None:
        self._reader, self._writer = reader, writer
        self._adapter, self._sock = adapter, sock
        self._seq = 0
        self._lock = threading.Lock()
        self._inbox: list[dict] = []
        self._cond = threading.Condition()
        self._closed = False
        self.terminals: list[subprocess.Popen] = []
        self._terminal_log = tempfile.TemporaryFile()  # noqa: SIM115 (closed by close())
        self.output: list[str] = []  # "output" events (stdout / stderr / console)
        threading.Thread(target=self._read_loop, daemon=True).start()

    # --- transports ---------------------------------------------------------------------------
    @classmethod
    def launch_adapter(cls) -> DAPClient:
        """Start ``python -m debugpy.adapter`` and talk to it over stdio."""
        proc = subprocess.Popen([sys.executable, "-m", "debugpy.adapter"], stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        return cls(proc.stdout, proc.stdin, adapter=proc)

    @classmethod
    def connect(cls, host: str, port: int, *, timeout: float = TIMEOUT) -> DAPClient:
        """Connect to the adapter that ``debugpy.listen`` started in a debuggee."""
        sock = socket.create_connection((host, port), timeout=timeout)
        sock.settimeout(None)
        return cls(sock.makefile("rb"), _SocketWriter(sock), sock=sock)

    # --- framing ------------------------------------------------------------------------------
    def _send(self, message: dict) -> None:
        body = json.dumps(message).encode("utf-8")
        with self._lock:
            self._writer.write(b"Content-Length: %d\r\n\r\n" % len(body) + body)
            self._writer.flush()

    def _read_loop(self) -> None:
        try:
            while True:
                length = None
                while True:
                    line = self._reader.readline()
                    if not line:
                        return
                    line = line.strip()
                    if not line:
                        break
                    name, _, value = line.decode("ascii").partition(":")
                    if name.lower() == "content-length":
                        length = int(value)
                data = b""
                while length and len(data) < length:
                    chunk = self._reader.read(length - len(data))
                    if not chunk:
                        return
                    data += chunk
                self._dispatch(json.loads(data))
        except (OSError, ValueError):
            return
        finally:
            with self._cond:
                self._closed = True
                self._cond.notify_all()

    def _dispatch(self, message: dict) -> None:
        if message.get("type") == "request" and message.get("command") == "runInTerminal":
            self._run_in_terminal(message)
            return
        if message.get("type") == "event" and message.get("event") == "output":
            self.output.append(message["body"].get("output", ""))
        with self._cond:
            self._inbox.append(message)
            self._cond.notify_all()

    def _run_in_terminal(self, request: dict) -> None:
        args = request["arguments"]
        env = dict(os.environ)
        for key, value in (args.get("env") or {}).items():
            if value is None:
                env.pop(key, None)
            else:
                env[key] = value
        proc = subprocess.Popen(args["args"], cwd=args.get("cwd") or None, env=env,
                                stdin=subprocess.DEVNULL, stdout=self._terminal_log,
                                stderr=subprocess.STDOUT)
        self.terminals.append(proc)
        self._send({"seq": self._next_seq(), "type": "response", "request_seq": request["seq"],
                    "command": "runInTerminal", "success": True,
                    "body": {"processId": proc.pid}})

    @property
    def terminal_output(self) -> str:
        """What the processes started for ``runInTerminal`` printed so far."""
        self._terminal_log.seek(0)
        return self._terminal_log.read().decode("utf-8", "replace")

    def _next_seq(self) -> int:
        with self._lock:
            self._seq += 1
            return self._seq

    # --- requests and events ------------------------------------------------------------------
    def send(self, command: str, arguments: dict | None = None) -> int:
        """Send a request without waiting; returns its ``seq``."""
        seq = self._next_seq()
        self._send({"seq": seq, "type": "request", "command": command,
                    "arguments": arguments or {}})
        return seq

    def response(self, seq: int, *, timeout: float = TIMEOUT) -> dict:
        """The response to request ``seq`` (its body); a refusal raises :class:`DAPError`."""
        message = self._take(lambda m: m.get("type") == "response" and m["request_seq"] == seq,
                             timeout, f"the response to request {seq}")
        if not message.get("success"):
            raise DAPError(f"{message['command']} failed: {message.get('message')}\n"
                           f"{self.diagnostics()}")
        return message.get("body") or {}

    def request(self, command: str, arguments: dict | None = None, *,
                timeout: float = TIMEOUT) -> dict:
        """Send a request and wait for its answer."""
        return self.response(self.send(command, arguments), timeout=timeout)

    def event(self, name: str, *, timeout: float = TIMEOUT) -> dict:
        """The next ``name`` event's body (events are consumed in order)."""
        message = self._take(lambda m: m.get("type") == "event" and m["event"] == name,
                             timeout, f"the {name!r} event")
        return message.get("body") or {}

    def _take(self, match: Callable[[dict], bool], timeout: float, what: str) -> dict:
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for i, message in enumerate(self._inbox):
                    if match(message):
                        return self._inbox.pop(i)
                left = deadline - time.monotonic()
                if self._closed or left <= 0:
                    state = "the connection closed" if self._closed else f"{timeout:.0f} s passed"
                    raise DAPError(f"waited for {what}, but {state}\n{self.diagnostics()}")
                self._cond.wait(min(left, 0.5))

    def diagnostics(self) -> str:
        """Debuggee output so far, for failure messages."""
        return ("--- debuggee output ---\n" + "".join(self.output)[-3000:]
                + "\n--- terminal ---\n" + self.terminal_output[-3000:])

    # --- a session ----------------------------------------------------------------------------
    def initialize(self) -> dict:
        """The ``initialize`` handshake, with VS Code's client capabilities."""
        return self.request("initialize", {
            "clientID": "vscode", "clientName": "torchlens_edu tests", "adapterID": "debugpy",
            "pathFormat": "path", "linesStartAt1": True, "columnsStartAt1": True,
            "supportsVariableType": True, "supportsVariablePaging": True,
            "supportsRunInTerminalRequest": True, "locale": "en"})

    def start(self, config: dict[str, Any], breakpoints: dict[Path, list[int]] | None = None
              ) -> dict:
        """``launch`` or ``attach`` with a configuration, through ``configurationDone``;
        ``breakpoints``: file -> lines, set as a learner sets them in the editor."""
        seq = self.send(config["request"], config)
        self.event("initialized")
        for path, lines in (breakpoints or {}).items():
            self.request("setBreakpoints", {"source": {"path": str(path)},
                                            "breakpoints": [{"line": n} for n in lines]})
        self.request("setExceptionBreakpoints", {"filters": []})
        self.request("configurationDone")
        return self.response(seq)

    def stopped(self, *, timeout: float = TIMEOUT) -> tuple[int, dict]:
        """Wait for ``stopped``; returns the thread id and its top stack frame."""
        body = self.event("stopped", timeout=timeout)
        thread = body["threadId"]
        frames = self.request("stackTrace", {"threadId": thread, "startFrame": 0,
                                             "levels": 20})["stackFrames"]
        return thread, frames[0]

    def locals(self, frame_id: int) -> dict[str, dict]:
        """The Variables pane's "Locals" of a frame: name -> DAP variable."""
        scopes = self.request("scopes", {"frameId": frame_id})["scopes"]
        ref = next(s for s in scopes if s["name"].lower().startswith("locals"))
        return self.children(ref["variablesReference"])

    def children(self, reference: int) -> dict[str, dict]:
        """What expanding a variable shows: name -> DAP variable."""
        found = self.request("variables", {"variablesReference": reference})["variables"]
        return {v["name"]: v for v in found}

    def evaluate(self, expression: str, frame_id: int, context: str = "repl") -> str:
        """The Debug Console's answer to ``expression`` in that frame."""
        return self.request("evaluate", {"expression": expression, "frameId": frame_id,
                                         "context": context})["result"]

    def close(self) -> None:
        """End the session and kill everything this client started."""
        for proc in [*self.terminals, self._adapter]:
            if proc is not None and proc.poll() is None:
                proc.kill()
                proc.wait(timeout=10)
        if self._sock is not None:
            self._sock.close()
        self._terminal_log.close()

    def __enter__(self) -> DAPClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class _SocketWriter:
    """``write`` that sends every byte (a raw socket file may write only part of them)."""

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock

    def write(self, data: bytes) -> int:
        self._sock.sendall(data)
        return len(data)

    def flush(self) -> None:
        return None


def shipped_configuration(name_part: str) -> dict[str, Any]:
    """The configuration of the shipped ``launch.json`` whose name contains ``name_part``."""
    from torchlens_edu._core.jsonc import parse
    from torchlens_edu.commands.vscode import template

    configs = parse(template("launch.json")).plain()["configurations"]
    found = [c for c in configs if name_part in c["name"]]
    assert len(found) == 1, f"{name_part!r} names {len(found)} configurations"
    return found[0]


def source_path(frame: dict) -> Path:
    """The resolved file of a DAP stack frame."""
    return Path(frame["source"]["path"]).resolve()
