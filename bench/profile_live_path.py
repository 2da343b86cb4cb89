"""CPU per request of the live path at saturation, and where it goes (py-spy).

Run from the repository root (the proxy is this checkout's ``proxy`` package, run as ``python -m proxy``):

    .venv/bin/python bench/profile_live_path.py                      # 3 x 10 s windows: CPU us per request
    .venv/bin/python bench/profile_live_path.py --profile 20         # then py-spy record 20 s, top functions
    .venv/bin/python bench/profile_live_path.py --no-record          # mirroring on, recording off
    .venv/bin/python bench/profile_live_path.py --isolation both     # shadow.isolation inline, then process

It starts a redis-server, two fast upstreams (``bench/live_path.py _upstream --mode fast``: incumbent and
candidate) and one ``serve`` process (one worker, mirroring at the default sample rate 1.0, recording on),
pins the proxy to the first core and everything else to the last, saturates it with ``wrk`` (32 keep-alive
connections, the same 98-byte POST as ``bench/live_path.py``) and reads the proxy's CPU time
(``/proc/<pid>/stat``, user + system) over each window: CPU us per request = CPU time / requests answered.
With ``shadow.isolation = "process"`` the serving process is ``serve``'s spawned worker and the shadow process
the worker's child (both inherit the pin): their CPU is read apart, "serving" and "shadow" per request.
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
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
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


def cpu_seconds(pid: int) -> tuple[float, float]:
    """User and system CPU of a process and its threads, from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[11]) / TICK, int(fields[12]) / TICK


def tree(pid: int) -> list[tuple[int, int]]:
    """The process and its descendants, each with its depth (0: the process itself)."""
    found, todo = [], [(pid, 0)]
    while todo:
        current, depth = todo.pop()
        found.append((current, depth))
        with contextlib.suppress(OSError):
            children = Path(f"/proc/{current}/task/{current}/children").read_text().split()
            todo += [(int(child), depth + 1) for child in children]
    return found


def split_cpu(pid: int) -> tuple[float, float, float]:
    """User and system CPU of ``serve`` and its worker (depth 0-1), and all CPU of deeper processes (the shadow
    process of process isolation)."""
    user = system = deeper = 0.0
    for current, depth in tree(pid):
        with contextlib.suppress(OSError):
            u, s = cpu_seconds(current)
            if depth <= 1:
                user, system = user + u, system + s
            else:
                deeper += u + s
    return user, system, deeper


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


def dropped(admin: int) -> str:
    """The proxy's counters of mirrors skipped and records dropped, as one line."""
    with urllib.request.urlopen(f"http://{HOST}:{admin}/metrics", timeout=5) as answer:
        text = answer.read().decode()
    wanted = ("shadow_proxy_mirrors_sent_total", "shadow_proxy_mirrors_skipped_total", "shadow_proxy_records_dropped_")
    lines = [line for line in text.splitlines() if line.startswith(wanted)]
    return "; ".join(lines) or "nothing sent, skipped or dropped"


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
    parser.add_argument("--windows", type=int, default=3, help="windows per proxy (alternating between proxies)")
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--no-record", action="store_true", help="recording off (mirroring stays on)")
    parser.add_argument("--no-mirror", action="store_true", help="no candidate")
    parser.add_argument(
        "--isolation",
        choices=["inline", "process", "both"],
        default="inline",
        help="shadow.isolation of this checkout's proxy; both: measure it in each mode",
    )
    parser.add_argument(
        "--compare",
        action="append",
        default=[],
        metavar="DIR",
        help="also measure the proxy package of another checkout (e.g. a `git archive` of the base commit)",
    )
    parser.add_argument(
        "--instead",
        action="append",
        default=[],
        metavar="CMD",
        help="also measure this command, run by this Python ({incumbent} {candidate} {port} are filled in)",
    )
    parser.add_argument("--profile", type=float, default=0.0, help="then py-spy record the first proxy this long")
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--out", type=Path, default=None, help="also keep py-spy's collapsed stacks here")
    args = parser.parse_args()
    for tool in ("wrk", "taskset"):
        if shutil.which(tool) is None:
            raise SystemExit(f"{tool} not found (apt-get install wrk util-linux)")
    cores = sorted(os.sched_getaffinity(0))
    main_core, aux = str(cores[0]), str(cores[-1])
    python = sys.executable
    procs: list[subprocess.Popen[bytes]] = []

    def spawn(argv: list[str], core: str, code: Path = ROOT) -> subprocess.Popen[bytes]:
        # `python -m` puts the working directory first on sys.path: it must be the checkout measured.
        env = {**os.environ, "PYTHONPATH": str(code)}
        proc = subprocess.Popen(pinned(core, argv), cwd=code, env=env, start_new_session=True)
        procs.append(proc)
        return proc

    with tempfile.TemporaryDirectory(prefix="profile-live-") as tmp:
        workdir = Path(tmp)
        try:
            redis_port = free_port()
            spawn([find_redis_server(), "--port", str(redis_port), "--save", "", "--appendonly", "no"], aux)
            urls = {}
            for name in ("incumbent", "candidate"):
                upstream_port = free_port()
                upstream = [
                    python,
                    str(ROOT / "bench" / "live_path.py"),
                    "_upstream",
                    "--port",
                    str(upstream_port),
                    "--mode",
                    "fast",
                ]
                spawn([*upstream, "--delay-ms", "0"], aux)
                wait_for_port(upstream_port)
                urls[name] = f"http://{HOST}:{upstream_port}"
            wait_for_port(redis_port)
            record = "false" if args.no_record else "true"
            modes = ["inline", "process"] if args.isolation == "both" else [args.isolation]
            configs = {}
            for mode in modes:
                configs[mode] = workdir / f"proxy-{mode}.toml"
                text = f'[proxy]\nlog_level = "warning"\n\n[record]\nenabled = {record}\n'
                configs[mode].write_text(text + f'\n[shadow]\nisolation = "{mode}"\n')
            # Every process is started first and idles while another is measured (all on the same core).
            measured: list[tuple[str, subprocess.Popen[bytes], int]] = []
            admins: dict[str, int] = {}
            checkouts = [(f"this checkout ({mode})", ROOT, configs[mode]) for mode in modes]
            checkouts += [(str(d), Path(d).resolve(), configs[modes[0]]) for d in args.compare]
            for label, code, config in checkouts:
                port, admin = free_port(), free_port()
                argv = [python, "-m", "proxy", "serve", "--config", str(config), "--listen", f"{HOST}:{port}"]
                argv += ["--admin-listen", f"{HOST}:{admin}", "--incumbent", urls["incumbent"]]
                argv += ["--redis-url", f"redis://{HOST}:{redis_port}/0"]
                if not args.no_mirror:
                    argv += ["--candidate", urls["candidate"]]
                measured.append((label, spawn(argv, main_core, code), port))
                admins[label] = admin
            for command in args.instead:
                port = free_port()
                measured.append((command, spawn([python, *command.format(port=port, **urls).split()], main_core), port))
            for _, proc, port in measured:
                wait_for_port(port)
                # A shadow process runs on the other core, as it would on a core of its own in production: on
                # the serving core the scheduler would split the core between them, whatever each needs.
                for pid, depth in tree(proc.pid):
                    if depth >= 2:
                        subprocess.run(["taskset", "-pc", aux, str(pid)], check=True, capture_output=True)
                wrk(port, 3, args.connections, workdir, aux)  # warm-up
            results: dict[str, list[float]] = {label: [] for label, _, _ in measured}
            shadows: dict[str, list[float]] = {label: [] for label, _, _ in measured}
            for window in range(args.windows):
                for label, proc, port in measured[window % len(measured) :] + measured[: window % len(measured)]:
                    user, system, shadow = split_cpu(proc.pid)
                    requests = wrk(port, args.seconds, args.connections, workdir, aux)
                    user_after, system_after, shadow_after = split_cpu(proc.pid)
                    per_request = (user_after - user + system_after - system) / requests * 1e6
                    system_share = (system_after - system) / requests * 1e6
                    shadow_share = (shadow_after - shadow) / requests * 1e6
                    results[label].append(per_request)
                    shadows[label].append(shadow_share)
                    rate = requests / args.seconds
                    print(
                        f"{label}: {rate:6.0f} req/s {per_request:6.1f} us CPU/request serving "
                        f"({system_share:.0f} system), {shadow_share:6.1f} us in a shadow process",
                        flush=True,
                    )
            first = statistics.median(results[measured[0][0]])
            for label, values in results.items():
                median = statistics.median(values)
                spread = ", ".join(f"{v:.0f}" for v in values)
                shadow = statistics.median(shadows[label])
                print(
                    f"median {median:6.1f} us CPU/request serving ({median / first:.3f}x the first), "
                    f"{shadow:6.1f} in a shadow process  [{spread}]  {label}"
                )
            for label, admin in admins.items():
                print(f"{label}: {dropped(admin)}")
            if args.profile:
                profile(measured[0][1].pid, measured[0][2], args, workdir, aux, python)
        finally:
            for proc in reversed(procs):  # the proxies first, Redis last
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGTERM)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(10)


def profile(pid: int, port: int, args: argparse.Namespace, workdir: Path, aux: str, python: str) -> None:
    """py-spy record while wrk saturates the proxy; the top functions. Non-blocking, Python frames only: a
    blocking (or --native) profile stops the process per sample and overweights system calls."""
    raw = workdir / "profile.txt"
    spy = shutil.which("py-spy", path=str(Path(python).parent)) or "py-spy"
    wrk_argv = ["wrk", "-t1", f"-c{args.connections}", f"-d{args.profile + 4:g}s", "-s", str(workdir / "post.lua")]
    load = subprocess.Popen(pinned(aux, [*wrk_argv, f"http://{HOST}:{port}{PATH}"]), stdout=subprocess.DEVNULL)
    time.sleep(1)
    record = [spy, "record", "--pid", str(pid), "--duration", f"{args.profile:g}", "--nonblocking"]
    subprocess.run([*record, "--format", "raw", "-o", str(raw)], check=True, capture_output=True)
    load.wait()
    print(top_functions(raw, args.top))
    if args.out is not None:
        shutil.copy(raw, args.out)


if __name__ == "__main__":
    main()
