#!/usr/bin/env python3
"""The device check: everything the GPU path needs a real card for, in one command of at most six
minutes, on a machine with a GPU, CUDA 13's driver and NVRTC, PyTorch, Nsight Compute and
compute-sanitizer, and no Rust, GStreamer or network. It reads the package that pack.sh made
(target/device-check: the device binaries, xz-compressed) from a copy of the repository.

Each step runs under its own time limit, cut to what is left of the whole budget, and the check
goes on after a step fails. Writes to $OUT (or --out): `device-check.json`, the summary (machine,
package, each step's status, time and figures), and `device-check.log.xz`, every step's output.
Prints the summary's table last. Exits 1 if a step failed or ran out of time, else 0.

    python3 benchmarks/device_check/run.py                 # on the GPU machine, from the repository root

`--rehearsal` runs the same steps here against the emulated device (rehearse.sh sets it up):
small sizes, PyTorch on the CPU, and the tools a GPU machine has (nvidia-smi, ncu,
compute-sanitizer) skipped where they are not on PATH.
"""

import argparse
import ctypes
import datetime
import glob
import json
import lzma
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

REPOSITORY = Path(__file__).resolve().parents[2]
# The whole check's budget: the device's 15 minutes hold a start, this and a rerun.
BUDGET_S = 360
LARGE_TEST = "device_scoring_past_2_pow_31_elements_matches_the_cpu_path"
# compute-sanitizer's tools and the device tests each one runs: memory errors on the edge shapes
# and the underflowed values (the most bounds arithmetic), hazards on the f16 path's tile edges
# (the only kernels that share tiles through shared memory across warps).
SANITIZED = [
    ("memcheck", ["device_edge_shapes_equal_the_cpu_path", "device_ties_underflowed_values_as_the_cpu_does"]),
    ("initcheck", ["device_edge_shapes_equal_the_cpu_path", "device_ties_underflowed_values_as_the_cpu_does"]),
    ("racecheck", ["f16_inputs_at_the_edges_of_the_tiles"]),
    ("synccheck", ["f16_inputs_at_the_edges_of_the_tiles"]),
]


class Check:
    def __init__(self, args):
        self.args = args
        self.started = time.monotonic()
        self.out = Path(args.out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.work = Path(args.work)
        self.work.mkdir(parents=True, exist_ok=True)
        self.log = []
        self.steps = []
        self.environment = dict(os.environ, RUST_BACKTRACE="1", PYTHONUNBUFFERED="1")

    def left(self):
        return self.args.budget - (time.monotonic() - self.started)

    def record(self, name, status, seconds=0.0, **fields):
        step = {"name": name, "status": status, "seconds": round(seconds, 2), **fields}
        self.steps.append(step)
        detail = fields.get("reason") or fields.get("summary") or ""
        print(f"[{time.monotonic() - self.started:6.1f} s] {name}: {status} ({seconds:.1f} s) {detail}", flush=True)
        return step

    def run(self, name, command, limit, passed=lambda exit, output: exit == 0, results=None, describe=None, **fields):
        """Runs `command` under min(limit, what is left), killing its process group at the end.
        `passed` judges the exit status and output; `results` turns the output into figures, and
        `describe` those into the line the table shows."""
        limit = min(limit, self.left() - 5)
        if limit < 5:
            return self.record(name, "skipped", reason="out of time", command=command, **fields)
        self.log.append(f"\n===== {name}: {' '.join(map(str, command))} (limit {limit:.0f} s)\n")
        started = time.monotonic()
        process = subprocess.Popen(list(map(str, command)), cwd=REPOSITORY, env=self.environment, text=True,
                                   stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True,
                                   errors="replace")
        try:
            output, _ = process.communicate(timeout=limit)
            timed_out = False
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGTERM)
            try:
                output, _ = process.communicate(timeout=5)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                output, _ = process.communicate()
            timed_out = True
        seconds = time.monotonic() - started
        self.log.append(output)
        sys.stdout.write(output[-3000:] if len(output) > 3000 else output)
        fields = {"command": " ".join(map(str, command)), "exit": process.returncode, **fields}
        if timed_out:
            return self.record(name, "timed out", seconds, reason=f"over its {limit:.0f} s", **fields)
        status = "passed" if passed(process.returncode, output) else "failed"
        if results is not None:
            try:
                fields["results"] = results(output)
                if describe is not None:
                    fields.setdefault("summary", describe(fields["results"]))
            except Exception as error:  # a figure that could not be read fails the step, not the check
                status, fields["reason"] = "failed", f"could not read its figures: {error!r}"
        return self.record(name, status, seconds, **fields)

    def write(self):
        summary = {
            "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "seconds": round(time.monotonic() - self.started, 1),
            "budget_s": self.args.budget,
            "rehearsal": self.args.rehearsal,
            "steps": self.steps,
        }
        (self.out / "device-check.json").write_text(json.dumps(summary, indent=1, default=str))
        with lzma.open(self.out / "device-check.log.xz", "wt", preset=6) as log:
            log.write("".join(self.log))
        print("\n| step | status | seconds | detail |\n|---|---|---|---|")
        for step in self.steps:
            detail = step.get("reason") or step.get("summary") or ""
            print(f"| {step['name']} | {step['status']} | {step['seconds']} | {detail} |")
        return summary


def host_cpu():
    """The host CPU's model and the features that decide the towers' CPU paths and the rows
    benchmarks/RESULTS.md waits for (a Sapphire Rapids host has AMX-BF16): from /proc/cpuinfo."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError as error:
        return {"model": f"an unknown CPU ({error})", "features": {}}
    model = re.search(r"^model name\s*:\s*(.*)$", text, re.MULTILINE)
    flags = re.search(r"^flags\s*:\s*(.*)$", text, re.MULTILINE)
    flags = set(flags.group(1).split()) if flags else set()
    names = {"AVX2": "avx2", "AVX-512F": "avx512f", "AVX-512 BF16": "avx512_bf16", "AMX-BF16": "amx_bf16"}
    return {"model": model.group(1).strip() if model else "an unnamed CPU",
            "features": {name: flag in flags for name, flag in names.items()}}


def tests_summary(output):
    """The libtest summaries of a test run: passed, failed and ignored, added up."""
    totals = {"passed": 0, "failed": 0, "ignored": 0}
    for line in re.findall(r"^test result: .*$", output, re.MULTILINE):
        for count, kind in re.findall(r"(\d+) (passed|failed|ignored)", line):
            totals[kind] += int(count)
    return totals


def tests_described(totals):
    return ", ".join(f"{count} {kind}" for kind, count in totals.items())


def tests_passed(exit, output):
    totals = tests_summary(output)
    return exit == 0 and totals["failed"] == 0 and totals["passed"] > 0


def unpack(package, target):
    """The package's .xz files, decompressed into `target`, executable."""
    target.mkdir(parents=True, exist_ok=True)
    unpacked = {}
    for packed in sorted(package.glob("*.xz")):
        path = target / packed.stem
        with lzma.open(packed) as source, open(path, "wb") as sink:
            shutil.copyfileobj(source, sink)
        path.chmod(0o755)
        unpacked[packed.stem] = path
    return unpacked


def library_folders(names):
    """Folders that hold the CUDA libraries `names` the loader does not find, wherever this machine
    keeps them: the CUDA install or the NVIDIA wheels beside PyTorch. Returns (folders, missing)."""
    candidates = [*glob.glob("/usr/local/cuda*/lib64"), *glob.glob("/usr/local/cuda*/targets/x86_64-linux/lib")]
    for entry in sys.path:
        candidates += glob.glob(os.path.join(entry, "nvidia", "*", "lib"))
    folders, missing = [], []
    for name in names:
        try:
            ctypes.CDLL(name)
            continue  # the loader finds it already
        except OSError:
            pass
        found = next((folder for folder in candidates if os.path.exists(os.path.join(folder, name))), None)
        if found is None:
            missing.append(name)
        elif found not in folders:
            folders.append(found)
    return folders, missing


def unresolved_libraries(binary):
    """The shared libraries `ldd` cannot find for `binary`."""
    listing = subprocess.run(["ldd", str(binary)], capture_output=True, text=True).stdout
    return re.findall(r"^\s*(\S+) => not found", listing, re.MULTILINE)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--package", default="target/device-check")
    parser.add_argument("--out", default=os.environ.get("OUT", "target/device-check-out"))
    parser.add_argument("--work", default="/tmp/vtr-index-device-check")
    parser.add_argument("--budget", type=float, default=BUDGET_S)
    parser.add_argument("--rehearsal", action="store_true", help="small sizes against the emulated device")
    args = parser.parse_args()
    check = Check(args)
    package = REPOSITORY / args.package
    rehearsal = args.rehearsal

    manifest = package / "MANIFEST"
    check.record("package", "passed" if manifest.exists() else "failed",
                 summary=manifest.read_text().strip().replace("\n", "; ") if manifest.exists() else "",
                 reason=None if manifest.exists() else f"no {manifest}: run benchmarks/device_check/pack.sh")
    if shutil.which("nvidia-smi"):
        check.run("machine", ["nvidia-smi", "--query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm,"
                              "clocks.mem,clocks.max.mem,power.limit", "--format=csv"], 15,
                  results=lambda output: output.strip().splitlines())
    else:
        check.record("machine", "skipped", reason="nvidia-smi is not on PATH")
    cpu = host_cpu()
    check.record("cores", "passed", summary=f"{os.cpu_count()} cores of {cpu['model']}: " + ", ".join(
        f"{name} {'yes' if has else 'no'}" for name, has in cpu["features"].items()), cpu=cpu)

    started = time.monotonic()
    binaries = unpack(package, check.work / "bin")
    check.record("unpack", "passed" if binaries else "failed", time.monotonic() - started,
                 summary=", ".join(f"{name} {path.stat().st_size >> 20} MiB" for name, path in binaries.items()))
    needed = sorted({"libnvrtc.so.13", "libnvrtc-builtins.so.13.0",
                     *(library for binary in binaries.values() for library in unresolved_libraries(binary))})
    folders, missing = library_folders(needed)
    check.environment["LD_LIBRARY_PATH"] = ":".join(folders + [check.environment.get("LD_LIBRARY_PATH", "")])
    check.record("libraries", "failed" if missing else "passed", summary=f"from {folders or 'the loader'}",
                 reason=f"not found: {missing}" if missing else None)

    gpu_score, gpu_tests, tower = (binaries.get(name) for name in ["gpu_score", "gpu_tests", "tower_throughput"])
    if gpu_score is None or gpu_tests is None:
        check.record("device", "failed", reason="the package lacks gpu_score or gpu_tests")
        check.write()
        return 1
    check.run("probe", [gpu_score, "probe"], 60, passed=lambda exit, output: exit == 0 and "kernels loaded from" in output,
              results=lambda output: output.strip().splitlines(),
              describe=lambda lines: next((line for line in lines if line.startswith("cuda:0:")), ""))
    check.run("device tests", [gpu_tests, "--include-ignored", "--skip", LARGE_TEST], 150, passed=tests_passed,
              results=tests_summary, describe=tests_described)
    if shutil.which("compute-sanitizer"):
        for tool, tests in SANITIZED:
            check.run(f"compute-sanitizer {tool}",
                      ["compute-sanitizer", "--tool", tool, "--error-exitcode", "3", "--print-limit", "20",
                       gpu_tests, "--ignored", "--exact", "--test-threads", "1", *tests],
                      75, passed=tests_passed, results=tests_summary,
                      describe=tests_described)
    else:
        for tool, _ in SANITIZED:
            check.record(f"compute-sanitizer {tool}", "skipped", reason="compute-sanitizer is not on PATH")
    side = 1500 if rehearsal else 48_000
    check.environment["VTR_INDEX_LARGE_SCORE_SIDE"] = str(side)
    check.run(f"{side:,}² against the CPU", [gpu_tests, "--ignored", "--exact", "--nocapture", LARGE_TEST], 150,
              passed=tests_passed, results=lambda output: re.findall(r"^\d.*(?: s| checked exactly)$", output, re.MULTILINE),
              describe="; ".join)

    scoring = check.work / "scoring.json"
    sizes = ["--stored", "2048", "--score", "1024", "--copy-mib", "64", "--torch-device", "cpu"] if rehearsal else []
    profile = ["--ncu"] if shutil.which("ncu") else []
    check.run("scoring against PyTorch", [sys.executable, "benchmarks/gpu_vs_pytorch.py", "--bin", gpu_score,
                                          "--json", scoring, "--work", check.work / "gpu", *sizes, *profile], 150,
              results=lambda _: json.loads(scoring.read_text()),
              describe=lambda figures: ", ".join(f"{row['n']}² {row.get('inputs', 'stored')} {row['speedup']:.2f}×"
                                                 for row in figures["stored"] + figures["score"])
              + ("" if profile else "; ncu is not on PATH: no roofs"))

    for dtype in ["f32", "f16"]:
        name = f"image tower {dtype} against PyTorch"
        if tower is None:
            check.record(name, "skipped", reason="the package has no tower_throughput (pack.sh --no-tower)")
            continue
        frames = ["--frames", "8", "--batch", "4", "--rounds", "1", "--device", "cpu"] if rehearsal else \
            ["--frames", "2048", "--batch", "256", "--rounds", "2", "--device", "cuda"]
        if rehearsal and dtype == "f16":
            check.record(name, "skipped", reason="f16 runs only on the device")
            continue
        tower_json = check.work / f"tower_{dtype}.json"
        check.run(name, [sys.executable, "benchmarks/tower_vs_pytorch.py", "--bin", tower, "--dtype", dtype, *frames,
                         "--work", check.work / "tower", "--json", tower_json], 90,
                  results=lambda _, path=tower_json: json.loads(path.read_text()),
                  describe=lambda figures: f"vtr-index / PyTorch {figures['median_ratio']:.2f}×, lowest cosine "
                  f"{min(r['lowest_cosine'] for r in figures['rounds']):.5f}")

    summary = check.write()
    return 1 if any(step["status"] in ("failed", "timed out") for step in summary["steps"]) else 0


if __name__ == "__main__":
    sys.exit(main())
