"""Run untrusted model-written Python functions in a separate, limited process.

The code is never exec'd in the calling process. Each call starts
`python -I -S -B -c RUNNER` (isolated mode: no environment variables, no user or
site-packages, no sitecustomize, no .pyc writes) with an empty environment, a fresh
temporary working directory and its own session (so the whole group can be killed).
Before it reads the candidate code, the runner lowers its own hard resource limits
(CPU seconds, address space, file size, core dumps) — in the child rather than in a
`preexec_fn`, which is unsafe in a parent with threads (the server, torch) — and
installs a PEP 578 audit hook, which cannot be removed, that refuses network (every
`socket.*` event), process creation (subprocess, fork, exec, spawn, system), file
writes and filesystem changes, ctypes and signals. The parent enforces a wall-clock
limit and kills the process group when it is passed.

Return values travel back as JSON through a result file the runner opens before the
hook is installed; the parent compares them with the expected values (so a
candidate cannot redefine equality). This contains accidents and careless code — an
infinite loop, a stray file write, a network call — which is what a scorer meets;
it is not a security boundary against a determined adversary (use a container for
that).
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field

# Runs in the child. argv: result file, CPU seconds, address-space bytes, file bytes;
# stdin: {"code": str, "function": str, "inputs": [json text of an argument list]}.
RUNNER = r'''
import json, os, resource, sys
for limit, value in ((resource.RLIMIT_CPU, sys.argv[2]), (resource.RLIMIT_AS, sys.argv[3]),
                     (resource.RLIMIT_FSIZE, sys.argv[4]), (resource.RLIMIT_CORE, 0)):
    resource.setrlimit(limit, (int(value), int(value)))
payload = json.loads(sys.stdin.read())
result_file = open(sys.argv[1], "w")
sys.stdout = sys.stderr = open(os.devnull, "w")
BLOCKED = ("socket.", "subprocess.", "os.system", "os.exec", "os.fork", "os.forkpty",
           "os.posix_spawn", "os.spawn", "os.kill", "os.killpg", "os.remove",
           "os.unlink", "os.rmdir", "os.rename", "os.replace", "os.mkdir", "os.symlink",
           "os.link", "os.chmod", "os.chown", "os.truncate", "os.putenv", "os.unsetenv",
           "os.chdir", "os.setuid", "shutil.", "ctypes.", "pty.", "resource.setrlimit",
           "signal.", "webbrowser.", "urllib.", "http.", "ftplib.", "smtplib.",
           "imaplib.", "poplib.", "nntplib.", "telnetlib.", "sqlite3.connect")
WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND

def hook(event, args):
    if event.startswith(BLOCKED):
        raise PermissionError(f"sandbox: {event} is not allowed")
    if event == "open":
        mode, flags = args[1], args[2]
        if (isinstance(mode, str) and any(c in mode for c in "wax+")) or (
                isinstance(flags, int) and flags & WRITE_FLAGS):
            raise PermissionError(f"sandbox: opening {args[0]!r} for writing is not allowed")

sys.addaudithook(hook)
out = {"outputs": []}
try:
    namespace = {"__name__": "candidate"}
    exec(compile(payload["code"], "<candidate>", "exec"), namespace)
    fn = namespace[payload["function"]]
    for text in payload["inputs"]:
        try:
            value = fn(*json.loads(text))
            out["outputs"].append({"value": json.dumps(value, allow_nan=False)})
        except BaseException as e:
            out["outputs"].append({"error": f"{type(e).__name__}: {e}"[:300]})
except BaseException as e:
    out["error"] = f"{type(e).__name__}: {e}"[:300]
result_file.write(json.dumps(out))
result_file.close()
os._exit(0)
'''


@dataclass(frozen=True)
class SandboxLimits:
    """Limits of one sandboxed run.

    wall_seconds: the parent kills the process group after this long.
    cpu_seconds: RLIMIT_CPU (the kernel stops a busy loop even if the parent stalls).
    memory_bytes: RLIMIT_AS of the child.
    file_bytes: RLIMIT_FSIZE: largest file the child may write (the result file).
    """

    wall_seconds: float = 5.0
    cpu_seconds: int = 5
    memory_bytes: int = 1 << 30
    file_bytes: int = 1 << 20


@dataclass
class RunResult:
    """What came back: one entry per input, {"value": json text} or {"error": str}.

    status: "ok" (the runner finished), "error" (the code did not compile or define
    the function), "timeout", or "crashed" (no result: killed, limit hit, os._exit).
    """

    status: str
    outputs: list[dict] = field(default_factory=list)
    detail: str = ""


def run_function(
    code: str, function: str, inputs: list[list], limits: SandboxLimits = SandboxLimits()
) -> RunResult:
    """Define `function` by running `code` in a sandboxed child, call it on each
    argument list of `inputs`, and return the JSON-encoded results."""
    payload = json.dumps({
        "code": code,
        "function": function,
        "inputs": [json.dumps(args) for args in inputs],
    })
    with tempfile.TemporaryDirectory(prefix="loramux-sandbox-") as work:
        result_path = os.path.join(work, "result.json")
        proc = subprocess.Popen(
            [sys.executable, "-I", "-S", "-B", "-c", RUNNER, result_path,
             str(limits.cpu_seconds), str(limits.memory_bytes), str(limits.file_bytes)],
            stdin=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            cwd=work,
            env={},
            start_new_session=True,
        )
        try:
            proc.communicate(payload.encode(), timeout=limits.wall_seconds)
        except subprocess.TimeoutExpired:
            _kill_group(proc)
            return RunResult("timeout", detail=f"ran past {limits.wall_seconds} s")
        except BaseException:
            _kill_group(proc)
            raise
        return _read_result(result_path, proc.returncode)


def _kill_group(proc: subprocess.Popen) -> None:
    """Kill the child's session. Only called before the child is reaped, so its pid
    (the group id) cannot have been reused."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    proc.wait()


def _read_result(path: str, returncode: int) -> RunResult:
    try:
        with open(path) as f:
            data = json.loads(f.read() or "null")
    except (OSError, ValueError):
        data = None
    if not isinstance(data, dict):
        return RunResult("crashed", detail=f"no result (exit status {returncode})")
    if "error" in data:
        return RunResult("error", detail=str(data["error"]))
    return RunResult("ok", outputs=list(data.get("outputs", [])))


def same_value(got, want) -> bool:
    """Equality of JSON values with types kept: True is not 1, "3" is not 3; ints and
    floats compare by value (1e-9 relative)."""
    if isinstance(want, bool) or isinstance(got, bool):
        return type(got) is type(want) and got == want
    if isinstance(want, (int, float)) and isinstance(got, (int, float)):
        return math.isclose(got, want, rel_tol=1e-9, abs_tol=1e-12)
    if isinstance(want, list) and isinstance(got, list):
        return len(got) == len(want) and all(map(same_value, got, want))
    if isinstance(want, dict) and isinstance(got, dict):
        return got.keys() == want.keys() and all(same_value(got[k], want[k]) for k in want)
    return type(got) is type(want) and got == want
