"""CPU per request of the live path at saturation, and where it goes (py-spy).

Run from the repository root (the proxy is this checkout's ``proxy`` package, run as ``python -m proxy``):

    .venv/bin/python bench/profile_live_path.py                      # 3 x 10 s windows: CPU us per request
    .venv/bin/python bench/profile_live_path.py --profile 20         # then py-spy record 20 s, top functions
    .venv/bin/python bench/profile_live_path.py --no-record          # mirroring on, recording off

It starts a redis-server, two fast upstreams (``bench/live_path.py _upstream --mode fast``: incumbent and
candidate) and one ``serve`` process (one worker, mirroring at the default sample rate 1.0, recording on),
pins the proxy to the first core and everything else to the last, saturates it with ``wrk`` (32 keep-alive
connections, the same 98-byte POST as ``bench/live_path.py``) and reads the proxy's CPU time
(``/proc/<pid>/stat``, user + system) over each window: CPU us per request = CPU time / requests answered.
Figures and the profile: ``docs/performance.md``, "Profile of the live path".
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from proxy.tools.embedded_redis import find_redis_server  # noqa: E402
HOST = "127.0.0.1"
PATH = "/v1/chat/completions"
REQUEST_BODY = '{"model":"bench","messages":[{"role":"user","content":"Say hello in one word."}],"max_tokens":8}'
TICK = os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


def wait_for_port(port: int, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection((HOST, port), timeout=0.5):
            return
        time.sleep(0.05)
    raise RuntimeError(f"nothing listening on {port}")


def cpu_seconds(pid: int) -> float:
    """User + system CPU of a process and its threads, from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK


def pinned(cores: str, argv: list[str]) -> list[str]:
    return ["taskset", "-c", cores, *argv]


def wrk(port: int, seconds: float, connections: int, workdir: Path, aux: str) -> int:
    script = workdir / "post.lua"
    body = REQUEST_BODY.replace('"', '\\"')
    script.write_text(f'wrk.method = "POST"\nwrk.body = "{body}"\nwrk.headers["Content-Type"] = "application/json"\n')
    argv = ["wrk", "-t1", f"-c{connections}", f"-d{seconds:g}s", "-s", str(script), f"http://{HOST}:{port}{PATH}"]
    out = subprocess.run(pinned(aux, argv), capture_output=True, text=True, check=True).stdout
    if "Non-2xx" in out or "Socket errors" in out:
        raise RuntimeError(f"wrk saw errors:\n{out}")
    match = re.search(r"(\d+) requests in", out)
    assert match, out
    return int(match.group(1))


def top_functions(raw: Path, count: int) -> str:
    """Self and inclusive shares of py-spy's collapsed stacks ("frame;frame;... samples" per line)."""
    own: collections.Counter[str] = collections.Counter()
    inclusive: collections.Counter[str] = collections.Counter()
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, samples = line.rpartition(" ")
        n = int(samples)
        frames = [re.sub(r" \((?:[^()]*/)?([^/()]+\.py):\d+\)$", r" (\1)", f) for f in stack.split(";")]
        total += n
        own[frames[-1]] += n
        for frame in set(frames):
            inclusive[frame] += n
    rows = [f"{total} samples", "self%  function"]
    rows += [f"{100 * n / total:5.1f}  {frame}" for frame, n in own.most_common(count)]
    rows += ["", "incl%  function"]
    rows += [f"{100 * n / total:5.1f}  {frame}" for frame, n in inclusive.most_common(count * 2)]
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=10.0, help="one measured window")
    parser.add_argument("--windows", type=int, default=3)
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--no-record", action="store_true", help="recording off (mirroring stays on)")
    parser.add_argument("--no-mirror", action="store_true", help="no candidate")
    parser.add_argument("--profile", type=float, default=0.0, help="then py-spy record this many seconds")
    parser.add_argument(
        "--instead", default="", help="measure this command instead of the proxy ({incumbent} {candidate} {port})"
    )
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--out", type=Path, default=None, help="also write the py-spy speedscope profile here")
    args = parser.parse_args()
    for tool in ("wrk", "taskset"):
        if shutil.which(tool) is None:
            raise SystemExit(f"{tool} not found (apt-get install wrk util-linux)")
    cores = sorted(os.sched_getaffinity(0))
    main_core, aux = str(cores[0]), str(cores[-1])
    python = sys.executable
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    procs: list[subprocess.Popen[bytes]] = []

    def spawn(argv: list[str], core: str) -> subprocess.Popen[bytes]:
        proc = subprocess.Popen(pinned(core, argv), cwd=ROOT, env=env, start_new_session=True)
        procs.append(proc)
        return proc

    with tempfile.TemporaryDirectory(prefix="profile-live-") as tmp:
        workdir = Path(tmp)
        try:
            redis_port = free_port()
            spawn([find_redis_server(), "--port", str(redis_port), "--save", "", "--appendonly", "no"], aux)
            ports = {}
            for name in ("incumbent", "candidate"):
                ports[name] = free_port()
                upstream = [python, "bench/live_path.py", "_upstream", "--port", str(ports[name]), "--mode", "fast"]
                spawn([*upstream, "--delay-ms", "0"], aux)
            for port in (redis_port, *ports.values()):
                wait_for_port(port)
            config = workdir / "proxy.toml"
            record = "false" if args.no_record else "true"
            config.write_text(f'[proxy]\nlog_level = "warning"\n\n[record]\nenabled = {record}\n')
            port, admin = free_port(), free_port()
            argv = [python, "-m", "proxy", "serve", "--config", str(config), "--listen", f"{HOST}:{port}"]
            argv += ["--admin-listen", f"{HOST}:{admin}", "--incumbent", f"http://{HOST}:{ports['incumbent']}"]
            argv += ["--redis-url", f"redis://{HOST}:{redis_port}/0"]
            if not args.no_mirror:
                argv += ["--candidate", f"http://{HOST}:{ports['candidate']}"]
            if args.instead:
                urls = {name: f"http://{HOST}:{p}" for name, p in ports.items()}
                argv = [python, *args.instead.format(port=port, **urls).split()]
            proxy = spawn(argv, main_core)
            wait_for_port(port)
            wrk(port, 3, args.connections, workdir, aux)  # warm-up
            results = []
            for _ in range(args.windows):
                before = cpu_seconds(proxy.pid)
                requests = wrk(port, args.seconds, args.connections, workdir, aux)
                used = cpu_seconds(proxy.pid) - before
                results.append((requests / args.seconds, used / requests * 1e6))
                print(f"window: {requests / args.seconds:7.0f} req/s  {used / requests * 1e6:6.1f} us CPU/request")
            per_request = sorted(us for _, us in results)
            print(f"median: {per_request[len(per_request) // 2]:.1f} us CPU/request (all: {per_request})")
            if args.profile:
                raw = workdir / "profile.txt"
                spy = shutil.which("py-spy", path=str(Path(python).parent)) or "py-spy"
                record_cmd = [spy, "record", "--pid", str(proxy.pid), "--duration", f"{args.profile:g}", "--native"]
                load = subprocess.Popen(
                    pinned(aux, ["wrk", "-t1", f"-c{args.connections}", f"-d{args.profile + 4:g}s"])
                    + ["-s", str(workdir / "post.lua"), f"http://{HOST}:{port}{PATH}"],
                    stdout=subprocess.DEVNULL,
                )
                time.sleep(1)
                subprocess.run([*record_cmd, "--format", "raw", "-o", str(raw)], check=True, capture_output=True)
                load.wait()
                print(top_functions(raw, args.top))
                if args.out is not None:
                    shutil.copy(raw, args.out)
        finally:
            for proc in reversed(procs):  # the proxy first, Redis last
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGTERM)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(10)


if __name__ == "__main__":
    main()
