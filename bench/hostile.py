"""`make hostile`: what one client can do to everyone else, measured against a real
frisket-server on loopback.

1. Cancel inside a step: the largest exact-attribution job the default limits admit on a
   full-size SD 1.5 UNet is cancelled while its first step runs; how long until its stream
   ends and until the job queued behind it starts.
2. Shutdown: `--grace-period 2` with a 512² step running, SIGTERM, RUNS times: exit code,
   seconds from the signal to exit, and what the client saw.
3. Mixed load on the shipped model: well-behaved clients alone, then alongside hostile
   ones (undecodable bytes, invalid UTF-8, forged job ids, 16-bit 4096² PNGs, oversize
   fields, floods of Cancel, readers that never read): jobs done, job times, hostile calls
   by status code, server RSS and log growth.

Usage: hostile.py SERVER_BIN CLIENT_BIN CACHE_DIR OUT_JSON
Prints the machine first (timings are only comparable within one run); JSON to OUT_JSON.
"""

import io
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import grpc
import numpy as np
from PIL import Image

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(ROOT / "tests" / "interop"))
import machine  # noqa: E402
from gpu_check import build_sd15  # noqa: E402
from grpc_interop import load_stubs  # noqa: E402

GRACE_RUNS = int(os.environ.get("HOSTILE_GRACE_RUNS", "10"))
LOAD_SECONDS = float(os.environ.get("HOSTILE_LOAD_SECONDS", "60"))
# Into the first exact attribution: well under way, far from its end.
CANCEL_AFTER_STARTED = 4.0


class Server:
    """A frisket-server child on an ephemeral loopback port; stderr (the log) to a file."""

    def __init__(self, server_bin: str, models: Path, log: Path, extra: tuple = ()):
        self.log = log
        self.proc = subprocess.Popen(
            [server_bin, "serve", "--models", str(models), "--listen", "127.0.0.1:0", "--device", "cpu", *extra],
            stdout=subprocess.PIPE,
            stderr=log.open("wb"),
            text=True,
        )
        line = self.proc.stdout.readline()
        if "listening on" not in line:
            raise SystemExit(f"server did not start: {line!r}\n{log.read_text()[-2000:]}")
        self.addr = line.strip().rsplit(" ", 1)[-1]
        self.url = "http://" + self.addr

    def memory(self) -> dict:
        """VmRSS and VmHWM (peak) in MB."""
        fields = {}
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                fields[key] = int(value.split()[0]) / 1024
        return fields

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


class Job:
    """A `frisket generate --json` child; its lines are read as they come, with times."""

    def __init__(self, client_bin: str, url: str, args: list):
        self.proc = subprocess.Popen(
            [client_bin, "--server", url, "--json", "generate", *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )
        self.lines = []  # (perf_counter, event dict)
        self.cond = threading.Condition()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            with self.cond:
                self.lines.append((time.perf_counter(), json.loads(line)))
                self.cond.notify_all()
        with self.cond:
            self.lines.append((time.perf_counter(), None))
            self.cond.notify_all()

    def wait_for(self, *names: str, timeout: float = 600) -> tuple:
        """The first line whose event is one of `names`, or the end of output (None)."""
        deadline = time.perf_counter() + timeout
        with self.cond:
            while True:
                for stamp, event in self.lines:
                    if event is None or event["event"] in names:
                        return stamp, event
                if not self.cond.wait(deadline - time.perf_counter()):
                    raise TimeoutError(f"no {names} within {timeout} s")

    def count(self, name: str) -> int:
        with self.cond:
            return sum(1 for _, e in self.lines if e is not None and e["event"] == name)


def reference_png(path: Path, size: int) -> Path:
    pixels = np.random.default_rng(0).integers(0, 256, (size, size, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    return path


def cancel_inside_step(server_bin: str, client_bin: str, cache: Path, tmp: Path) -> dict:
    folder = cache / "bench-sd15-full"
    if not (folder / "model_index.json").exists():
        build_sd15(folder, cache)
    server = Server(server_bin, cache, tmp / "cancel.log")
    try:
        out = str(tmp / "out.png")

        def small(prompt: str, steps: int) -> list:
            size = ["--width", "256", "--height", "256"]
            return ["--model", folder.name, "--prompt", prompt, "--steps", str(steps), *size, "--out", out]

        warm = Job(client_bin, server.url, small("warm", 1))
        warm.proc.wait()
        reference = reference_png(tmp / "reference.png", 1024)
        refused, job, size = None, None, None
        for size in range(1024, 63, -64):
            args = ["--model", folder.name, "--prompt", "a lighthouse on a cliff", "--reference", str(reference)]
            args += ["--width", str(size), "--height", str(size), "--steps", "10", "--strength", "0.9"]
            args += ["--explain", "exact", "--job-id", f"exact-{size}", "--out", out]
            job = Job(client_bin, server.url, args)
            _, first = job.wait_for("queued", "started", "error")
            if first is not None and first["event"] != "error":
                break
            refused = refused or (first or {}).get("message")
            job.proc.wait()
        # The job queued behind it: plain, small.
        behind = Job(client_bin, server.url, small("next", 2))
        _, started = job.wait_for("started")
        # Cancel while the first exact attribution runs: after the steps before it.
        first_manipulation = started["manipulation_steps"][0]
        while job.count("step") < first_manipulation and job.proc.poll() is None:
            time.sleep(0.05)
        attribution_began = time.perf_counter()
        time.sleep(CANCEL_AFTER_STARTED)
        cancel_at = time.perf_counter()
        cancel = subprocess.run(
            [client_bin, "--server", server.url, "cancel", f"exact-{size}"], capture_output=True, text=True
        )
        cancel_returned = time.perf_counter()
        ended, last = job.wait_for("error", "result")
        behind_started, _ = behind.wait_for("started")
        behind.proc.wait()
        return {
            "model": "random full-size SD 1.5 UNet, fp16 weights computed in fp32 on the CPU",
            "largest_admitted_exact_size": size,
            "first_refusal": refused,
            "cancel_after_started_s": CANCEL_AFTER_STARTED,
            "steps_done_before_cancel": job.count("step"),
            "cancel_call_s": round(cancel_returned - cancel_at, 3),
            "cancel_exit": cancel.returncode,
            "stream_end_after_cancel_s": round(ended - cancel_at, 3),
            "stream_end_code": (last or {}).get("code"),
            "next_job_started_after_cancel_s": round(behind_started - cancel_at, 3),
            "cancelled_during_step": first_manipulation,
            "attribution_ran_before_cancel_s": round(cancel_at - attribution_began, 3),
        }
    finally:
        server.stop()


def grace_runs(server_bin: str, client_bin: str, cache: Path, tmp: Path) -> dict:
    runs = []
    for i in range(GRACE_RUNS):
        server = Server(server_bin, cache, tmp / f"grace-{i}.log", ("--grace-period", "2"))
        job = Job(
            client_bin,
            server.url,
            ["--model", "bench-sd15-full", "--prompt", "a long step", "--steps", "20"]
            + ["--width", "512", "--height", "512", "--out", str(tmp / "grace.png")],
        )
        job.wait_for("started")
        time.sleep(1.0)
        signalled = time.perf_counter()
        server.proc.send_signal(signal.SIGTERM)
        try:
            code = server.proc.wait(60)
        except subprocess.TimeoutExpired:
            code = None
        exited = time.perf_counter()
        _, last = job.wait_for("error", "result")
        job.proc.wait()
        runs.append(
            {
                "exit_code": code,
                "exit_after_sigterm_s": round(exited - signalled, 3),
                "client_code": (last or {}).get("code"),
                "client_message": (last or {}).get("message"),
                "steps_done": job.count("step"),
            }
        )
        server.stop()
        print(f"  grace run {i + 1}: {runs[-1]}", flush=True)
    return {
        "grace_period_s": 2,
        "runs": runs,
        "exit_0": sum(r["exit_code"] == 0 for r in runs),
        "max_exit_after_sigterm_s": max((r["exit_after_sigterm_s"] for r in runs), default=None),
        "client_unavailable": sum(r["client_code"] == "UNAVAILABLE" for r in runs),
    }


def png16(size: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full((size, size), 30000, dtype=np.uint16)).save(buf, format="PNG")
    return buf.getvalue()


def hostile_calls(pb, channel: grpc.Channel) -> list:
    """(name, callable returning a grpc code name) for each kind of hostile call."""
    raw_generate = channel.unary_stream("/frisket.v1.Frisket/Generate")
    raw_cancel = channel.unary_unary("/frisket.v1.Frisket/Cancel")
    stub_generate = channel.unary_stream(
        "/frisket.v1.Frisket/Generate", request_serializer=lambda m: m.SerializeToString()
    )
    bomb = png16(4096)
    forged = ("x\n2026-12-06T00:00:00Z  INFO frisket: forged line\x1b[31m" * 20000)[: 1 << 20]

    def drain(call) -> str:
        try:
            for _ in call:
                pass
            return "OK"
        except grpc.RpcError as e:
            return e.code().name

    def unary(call) -> str:
        try:
            call()
            return "OK"
        except grpc.RpcError as e:
            return e.code().name

    def stalled() -> str:
        # Opens a job that streams a preview and latent every step and reads one event.
        request = pb.GenerateRequest(model="shapes", prompt="a red circle", steps=20)
        request.stream.previews.enabled = True
        request.stream.previews.every = 1
        request.stream.latents.enabled = True
        request.stream.latents.every = 1
        call = stub_generate(request, timeout=120)
        next(call)
        time.sleep(5)
        call.cancel()
        return "CANCELLED (client)"

    def invalid_utf8() -> str:
        # field 2 (prompt), length-delimited, bytes that are not UTF-8.
        return drain(raw_generate(b"\x0a\x06shapes\x12\x04\xff\xfe\xfd\xfc", timeout=30))

    return [
        ("garbage bytes", lambda: drain(raw_generate(os.urandom(200), timeout=30))),
        ("invalid UTF-8", invalid_utf8),
        ("1 MB forged job id", lambda: drain(stub_generate(pb.GenerateRequest(model="shapes", job_id=forged)))),
        (
            "16-bit 4096² PNG",
            lambda: drain(stub_generate(pb.GenerateRequest(model="shapes", prompt="x", reference_image=bomb))),
        ),
        ("10⁶ steps", lambda: drain(stub_generate(pb.GenerateRequest(model="shapes", steps=1_000_000)))),
        ("unknown model", lambda: drain(stub_generate(pb.GenerateRequest(model="../../etc/passwd")))),
        ("Cancel flood ×200", lambda: [unary(lambda: raw_cancel(b"\x0a\x04nope")) for _ in range(200)][-1]),
        ("reader that stops reading", stalled),
    ]


def mixed_load(server_bin: str, client_bin: str, tmp: Path) -> dict:
    server = Server(server_bin, ROOT / "models", tmp / "load.log")
    try:
        args = ["--model", "shapes", "--prompt", "a red circle on the left", "--steps", "20"]
        args += ["--preview-every", "1", "--out", str(tmp / "load.png")]
        Job(client_bin, server.url, args).proc.wait()  # loads the model

        def clients(seconds: float, hostile: bool) -> dict:
            times, failures, codes = [], [], {}
            stop = time.perf_counter() + seconds

            def polite():
                while time.perf_counter() < stop:
                    t0 = time.perf_counter()
                    job = Job(client_bin, server.url, args)
                    _, last = job.wait_for("result", "error")
                    job.proc.wait()
                    if last is not None and last["event"] == "result":
                        times.append(time.perf_counter() - t0)
                    else:
                        failures.append(last)

            def attacker(channel, calls):
                i = 0
                while time.perf_counter() < stop:
                    name, call = calls[i % len(calls)]
                    code = call()
                    codes.setdefault(name, {}).setdefault(code, 0)
                    codes[name][code] += 1
                    i += 1

            threads = [threading.Thread(target=polite) for _ in range(2)]
            channels = []
            if hostile:
                with tempfile.TemporaryDirectory() as stubs:
                    pb, _ = load_stubs(ROOT / "proto", Path(stubs))
                for k in range(2):
                    channel = grpc.insecure_channel(server.addr, options=[("grpc.max_send_message_length", 64 << 20)])
                    channels.append(channel)
                    calls = hostile_calls(pb, channel)
                    threads.append(threading.Thread(target=attacker, args=(channel, calls[k:] + calls[:k])))
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            for c in channels:
                c.close()
            return {
                "jobs_done": len(times),
                "job_failures": failures,
                "job_s_p50": round(statistics.median(times), 3) if times else None,
                "job_s_max": round(max(times), 3) if times else None,
                "hostile_calls_by_code": codes,
            }

        before = server.memory()
        log_before = server.log.stat().st_size
        alone = clients(LOAD_SECONDS / 2, hostile=False)
        mixed = clients(LOAD_SECONDS, hostile=True)
        after = server.memory()
        log = server.log.read_bytes()
        return {
            "seconds": {"alone": LOAD_SECONDS / 2, "mixed": LOAD_SECONDS},
            "alone": alone,
            "mixed": mixed,
            "rss_mb": {"before": round(before["VmRSS"]), "after": round(after["VmRSS"]), "peak": round(after["VmHWM"])},
            "log_growth_bytes": len(log) - log_before,
            "raw_escape_bytes_in_log": log.count(b"\x1b"),
            "forged_lines_in_log": sum(line.startswith(b"2026-12-06T00:00:00Z") for line in log.splitlines()),
            "server_alive": server.proc.poll() is None,
        }
    finally:
        server.stop()


def main(server_bin: str, client_bin: str, cache: Path, out: Path) -> None:
    report = {"machine": machine.describe()}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        print("1. cancel inside a step (largest exact job the limits admit)", flush=True)
        report["cancel"] = cancel_inside_step(server_bin, client_bin, cache, tmp)
        print(json.dumps(report["cancel"], indent=1), flush=True)
        print(f"2. SIGTERM with a long step running, --grace-period 2, {GRACE_RUNS} runs", flush=True)
        report["grace"] = grace_runs(server_bin, client_bin, cache, tmp)
        g = report["grace"]
        print(
            f"  exit 0 in {g['exit_0']}/{GRACE_RUNS}, slowest exit {g['max_exit_after_sigterm_s']} s after SIGTERM, "
            f"client UNAVAILABLE in {g['client_unavailable']}/{GRACE_RUNS}",
            flush=True,
        )
        print(f"3. mixed load, {LOAD_SECONDS:.0f} s with hostile clients", flush=True)
        report["load"] = mixed_load(server_bin, client_bin, tmp)
        print(json.dumps(report["load"], indent=1), flush=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], Path(sys.argv[3]), Path(sys.argv[4]))
