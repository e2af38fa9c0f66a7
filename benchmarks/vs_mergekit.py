#!/usr/bin/env python
"""Benchmark mergelab against mergekit on synthetic Llama-layout checkpoints.

What it does (see benchmarks/README.md for how to run it):
  1. generates a random Llama base (layout and shapes from ``transformers``) and N fine-tunes
     (base + dense or sparse Gaussian deltas), tensor by tensor with fixed seeds, as 3-shard
     safetensors checkpoints, cached under ``--workdir`` so that re-runs skip this step;
  2. installs mergekit==0.1.5 into its own virtual environment if it is missing (torch 2.13.0
     CPU first, so that mergekit's requirements cannot pull another torch);
  3. runs each recipe with each tool as a separate process, after a warm-up read of the inputs
     (both tools read from a warm page cache), and records wall time, CPU time and peak memory
     (``ru_maxrss`` of the child from ``wait4``, plus the peak of ``RssAnon`` sampled from
     ``/proc`` every 20 ms, i.e. the memory that is not the mmapped input files);
  4. compares the outputs tensor by tensor (max abs difference) where mergelab runs under
     mergekit semantics; for DARE and DELLA (random masks) it compares statistics instead;
  5. prints a Markdown table with the ratios and writes everything as JSON.

The benchmark is not part of the test suite; tests/test_vs_mergekit_smoke.py runs it at
``--size tiny --tools mergelab``.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MERGEKIT_VERSION = "0.1.5"
TORCH_VERSION = "2.13.0"
N_SHARDS = 3

# ---------------------------------------------------------------------------------------------
# synthetic checkpoints
# ---------------------------------------------------------------------------------------------

# Llama shapes (untied embeddings, no GQA). "1gb" is 248.1 M parameters = 0.99 GB in fp32.
SIZES = {
    "tiny": dict(hidden_size=64, intermediate_size=176, num_hidden_layers=2, vocab_size=512,
                 num_attention_heads=4),
    "100mb": dict(hidden_size=512, intermediate_size=1408, num_hidden_layers=6, vocab_size=8000,
                  num_attention_heads=8),
    "1gb": dict(hidden_size=1024, intermediate_size=2880, num_hidden_layers=14, vocab_size=32000,
                num_attention_heads=16),
    "4gb": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=17, vocab_size=32000,
                num_attention_heads=32),
}


def llama_shape_for(size: str) -> dict:
    """Config kwargs for a named size or a parameter count such as '50M' / '1.2B' / '300000000'."""
    if size in SIZES:
        return dict(SIZES[size])
    s = size.strip().upper()
    mult = {"K": 1e3, "M": 1e6, "B": 1e9, "G": 1e9}.get(s[-1:], 1)
    try:
        target = float(s[:-1] if mult != 1 else s) * mult
    except ValueError:
        raise SystemExit(f"--size {size!r}: expected one of {', '.join(SIZES)} or a parameter "
                         "count like 50M, 1.2B")
    # 1gb-like shapes, number of layers chosen to reach the target
    kw = dict(SIZES["1gb"])
    h, i, v = kw["hidden_size"], kw["intermediate_size"], kw["vocab_size"]
    per_layer = 4 * h * h + 3 * h * i + 2 * h
    kw["num_hidden_layers"] = max(1, round((target - 2 * v * h - h) / per_layer))
    return kw


def llama_layout(size: str):
    """(config, [(name, shape)]) from transformers, without allocating weights."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    kw = llama_shape_for(size)
    cfg = LlamaConfig(**kw, num_key_value_heads=kw["num_attention_heads"],
                      max_position_embeddings=2048, tie_word_embeddings=False)
    cfg.architectures = ["LlamaForCausalLM"]
    with torch.device("meta"):
        model = LlamaForCausalLM(cfg)
    layout = [(n, tuple(p.shape)) for n, p in model.state_dict().items()]
    return cfg, layout


def _seed(*parts: int) -> int:
    h = 1469598103934665603
    for p in parts:
        h = ((h ^ (p & 0xFFFFFFFF)) * 1099511628211) % (1 << 61)
    return h


def _base_tensor(seed: int, idx: int, name: str, shape):
    import torch
    if name.endswith("norm.weight"):
        # RMSNorm weights: around 1 (not exactly 1, so that deltas on them are non-trivial)
        g = torch.Generator().manual_seed(_seed(seed, idx, 1))
        return 1.0 + 0.02 * torch.randn(shape, generator=g)
    g = torch.Generator().manual_seed(_seed(seed, idx, 0))
    return torch.empty(shape).normal_(0.0, 0.02, generator=g)


def _delta_tensor(seed: int, model: int, idx: int, shape, kind: str, scale: float,
                  density: float):
    import torch
    g = torch.Generator().manual_seed(_seed(seed, idx, 100 + model))
    d = torch.empty(shape).normal_(0.0, scale, generator=g)
    if kind == "sparse":
        keep = torch.rand(shape, generator=g) < density
        d.mul_(keep)
    return d


def _shard_plan(layout, n_shards: int, bytes_per: int):
    total = sum(math.prod(s) for _, s in layout) * bytes_per
    limit = total / n_shards
    shards, cur, cur_bytes = [], [], 0
    for i, (name, shape) in enumerate(layout):
        nb = math.prod(shape) * bytes_per
        if cur and cur_bytes + nb > limit and len(shards) < n_shards - 1:
            shards.append(cur)
            cur, cur_bytes = [], 0
        cur.append(i)
        cur_bytes += nb
    shards.append(cur)
    return shards, total


def write_checkpoint(path: Path, cfg, layout, make_tensor, dtype, n_shards: int = N_SHARDS):
    """Write a HF-style sharded safetensors checkpoint one shard at a time (bounded memory)."""
    import torch
    from safetensors.torch import save_file

    tdtype = getattr(torch, dtype)
    bytes_per = torch.empty((), dtype=tdtype).element_size()
    shards, total = _shard_plan(layout, n_shards, bytes_per)
    tmp = path.with_name(path.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    cfg.dtype = dtype
    cfg.save_pretrained(tmp)
    weight_map = {}
    for si, idxs in enumerate(shards):
        fname = f"model-{si + 1:05d}-of-{len(shards):05d}.safetensors"
        sd = {}
        for i in idxs:
            name, shape = layout[i]
            sd[name] = make_tensor(i, name, shape).to(tdtype).contiguous()
            weight_map[name] = fname
        save_file(sd, str(tmp / fname), metadata={"format": "pt"})
        del sd
    with open(tmp / "model.safetensors.index.json", "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
    shutil.rmtree(path, ignore_errors=True)
    tmp.rename(path)


def generate(workdir: Path, size: str, n_models: int, delta: str, delta_scale: float,
             delta_density: float, dtype: str, seed: int, log) -> dict:
    """Generate (or reuse) base + fine-tunes; returns {'dir', 'base', 'models', 'n_params'}."""
    spec = dict(size=size, config=llama_shape_for(size), n_models=n_models, delta=delta,
                delta_scale=delta_scale, delta_density=delta_density if delta == "sparse" else None,
                dtype=dtype, seed=seed, generator=1)
    tag = f"{size}-{dtype}-{delta}-s{seed}"
    d = workdir / "ckpt" / tag
    marker = d / "spec.json"
    names = ["base"] + [f"ft{m + 1}" for m in range(n_models)]
    prev = json.loads(marker.read_text()) if marker.exists() else {}
    if "spec" not in prev:   # first format: the spec with n_params inside
        prev = {"spec": {k: v for k, v in prev.items() if k != "n_params"},
                "n_params": prev.get("n_params")}
    if prev["spec"] == spec and prev["n_params"]:
        n_params = prev["n_params"]
        log(f"checkpoints: reusing {d}")
    else:
        import torch
        torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
        cfg, layout = llama_layout(size)
        n_params = sum(math.prod(s) for _, s in layout)
        d.mkdir(parents=True, exist_ok=True)
        marker.unlink(missing_ok=True)
        t0 = time.perf_counter()
        for m, name in enumerate(names):
            if m == 0:
                def make(i, n, s):
                    return _base_tensor(seed, i, n, s)
            else:
                def make(i, n, s, m=m):
                    b = _base_tensor(seed, i, n, s)
                    return b.add_(_delta_tensor(seed, m, i, s, delta, delta_scale, delta_density))
            write_checkpoint(d / name, cfg, layout, make, dtype)
            log(f"checkpoints: wrote {d / name} ({time.perf_counter() - t0:.1f}s)")
        marker.write_text(json.dumps({"spec": spec, "n_params": n_params}, indent=2))
    return dict(dir=d, base=d / "base", models=[d / n for n in names[1:]], n_params=n_params,
                spec=spec)


# ---------------------------------------------------------------------------------------------
# recipes
# ---------------------------------------------------------------------------------------------

@dataclass
class Case:
    key: str                 # row label
    method: str              # merge_method
    model_params: dict       # per-model parameters
    params: dict             # global parameters
    compat: bool = True      # mergelab --compat mergekit; False = --compat paper (the papers' semantics)
    mergekit: bool = True    # mergekit runs this recipe
    compare: str = "exact"   # exact | stats | none
    mergekit_row: str = ""   # for mergelab-only rows: which mergekit row to take the ratio to
    seed: int | None = None
    extra_mergelab_params: dict = field(default_factory=dict)
    n_models: int | None = None   # fine-tunes merged (None: all); slerp takes one besides the base
    note: str = "not comparable (different algorithm)"   # the agreement cell of a compare="none" row


def all_tied(case: Case) -> Case:
    """``case`` with ``exact_ties: false`` (every tied magnitude at a cut kept), timed against its mergekit run."""
    return replace(case, key=f"{case.key}-alltied", mergekit=False, compare="none", mergekit_row=case.key,
                   extra_mergelab_params={**case.extra_mergelab_params, "exact_ties": False},
                   note="mergekit semantics, every entry tied at a cut kept (a few entries more than mergekit)")


_TIES = Case("ties", "ties", {"weight": 1.0, "density": 0.2}, {"normalize": True, "lambda": 1.0})
_BREADCRUMBS = Case("breadcrumbs", "breadcrumbs", {"weight": 1.0, "density": 0.1, "gamma": 0.01}, {"lambda": 1.0})
CASES = [
    Case("task_arithmetic", "task_arithmetic", {"weight": 1.0}, {"lambda": 0.5}),
    _TIES,
    Case("ties-global", "ties", {"weight": 1.0, "density": 0.2}, {"lambda": 1.0},
         compat=False, mergekit=False, compare="none", mergekit_row="ties",
         extra_mergelab_params={"trim_scope": "global"}),
    all_tied(_TIES),
    _BREADCRUMBS,
    all_tied(_BREADCRUMBS),
    Case("dare_ties", "dare_ties", {"weight": 1.0, "density": 0.5}, {"lambda": 1.0},
         compare="stats", seed=42),
    Case("slerp", "slerp", {}, {"t": 0.3}, n_models=1),
    Case("della", "della", {"weight": 1.0, "density": 0.5, "epsilon": 0.1}, {"lambda": 1.0},
         compare="stats", seed=42),
]
CASE_KEYS = [c.key for c in CASES]
COPY_KEY = "copy"   # the I/O reference row (read every input once, write the base's size once)
COPY_KEYS = (COPY_KEY, "copy-mmap")     # read()/write() and through memory maps


def recipe_dict(case: Case, ck: dict, dtype: str, for_mergelab: bool) -> dict:
    params = dict(case.params)
    if for_mergelab:
        params.update(case.extra_mergelab_params)
        if case.seed is not None:
            params["seed"] = case.seed
    return {
        "merge_method": case.method,
        "base_model": str(ck["base"]),
        "models": [{"model": str(p), **({"parameters": dict(case.model_params)} if case.model_params else {})}
                   for p in ck["models"][:case.n_models]],
        "parameters": params,
        "dtype": "float32",
        "out_dtype": dtype,
    }


def write_recipe(path: Path, recipe: dict) -> Path:
    import yaml
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


# ---------------------------------------------------------------------------------------------
# mergekit environment
# ---------------------------------------------------------------------------------------------

def mergekit_bin(venv: Path) -> Path:
    return venv / "bin" / "mergekit-yaml"


def ensure_mergekit(venv: Path, log) -> Path:
    """Create the venv with torch==2.13.0 (CPU) first, then mergekit==0.1.5, if missing."""
    exe = mergekit_bin(venv)
    if exe.exists():
        return exe
    log(f"mergekit: installing mergekit=={MERGEKIT_VERSION} into {venv}")
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "-q"]
    wheels = sorted(Path("/opt/wheels").glob(f"torch-{TORCH_VERSION}+cpu-*.whl"))
    torch_req = str(wheels[0]) if wheels else f"torch=={TORCH_VERSION}"
    extra = [] if wheels else ["--index-url", "https://download.pytorch.org/whl/cpu",
                               "--extra-index-url", "https://pypi.org/simple"]
    subprocess.run(pip + [torch_req] + extra, check=True)
    subprocess.run(pip + [f"mergekit=={MERGEKIT_VERSION}"], check=True)
    out = subprocess.run([str(venv / "bin" / "python"), "-c", "import torch; print(torch.__version__)"],
                         capture_output=True, text=True, check=True).stdout.strip()
    if not out.startswith(TORCH_VERSION):
        raise SystemExit(f"mergekit venv has torch {out}, expected {TORCH_VERSION}")
    return exe


# ---------------------------------------------------------------------------------------------
# measurement
# ---------------------------------------------------------------------------------------------

def warm_read(paths) -> float:
    """Read every file of the inputs once so that both tools start from a warm page cache."""
    t0 = time.perf_counter()
    buf = bytearray(16 << 20)
    for p in paths:
        for f in sorted(Path(p).iterdir()):
            if f.is_file():
                with open(f, "rb", buffering=0) as fh:
                    while fh.readinto(buf):
                        pass
    return time.perf_counter() - t0


# A small wrapper process spawns the measured command and reports its rusage. Measuring a child of
# this (large) Python process directly would be wrong: on Linux a child's ru_maxrss starts from the
# parent's peak RSS (vfork/exec carries the old mm's high-water mark), e.g. 800 MB for `sleep`.
_WRAPPER = r"""
import json, os, sys, time
t0 = time.perf_counter()
pid = os.posix_spawnp(sys.argv[2], sys.argv[2:], os.environ)
_, st, ru = os.wait4(pid, 0)
with open(sys.argv[1], "w") as f:
    json.dump({"rc": os.waitstatus_to_exitcode(st), "wall_s": time.perf_counter() - t0,
               "maxrss_kb": ru.ru_maxrss, "user_s": ru.ru_utime, "sys_s": ru.ru_stime}, f)
"""


# The I/O reference: what any merge of these checkpoints must at least do, as a plain copy in a fresh
# process without torch: read every input file once (4 GB for base + 3 fine-tunes at 1gb) and write the
# base's files once (1 GB) into a new folder, 16 MB at a time, with the same page cache state as the merges.
_COPY = r"""
import os, sys
out, base, others = sys.argv[1], sys.argv[2], sys.argv[3:]
os.makedirs(out, exist_ok=True)
buf = bytearray(16 << 20)
view = memoryview(buf)
for d in [base, *others]:
    for name in sorted(os.listdir(d)):
        src = os.path.join(d, name)
        if not os.path.isfile(src):
            continue
        dst = open(os.path.join(out, name), "wb", buffering=0) if d == base else None
        with open(src, "rb", buffering=0) as fh:
            while True:
                n = fh.readinto(buf)
                if not n:
                    break
                if dst is not None:
                    dst.write(view[:n])
        if dst is not None:
            dst.close()
"""


# The same copy through memory maps, as mergelab reads its inputs: every input mapped and each of its
# 8-byte words read once (a numpy sum over the mapping, so every byte reaches the CPU), the base's
# files written from their mappings. Python's -S keeps site-packages (numpy) off the path: the
# benchmark's own sys.path is passed in as the first argument.
_COPY_MMAP = r"""
import mmap, os, sys
sys.path[:0] = [p for p in sys.argv[1].split(os.pathsep) if p]
import numpy as np
out, base, others = sys.argv[2], sys.argv[3], sys.argv[4:]
os.makedirs(out, exist_ok=True)
step = 16 << 20
for d in [base, *others]:
    for name in sorted(os.listdir(d)):
        src = os.path.join(d, name)
        if not os.path.isfile(src) or os.path.getsize(src) == 0:
            continue
        with open(src, "rb") as fh:
            mm = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
        n = len(mm)
        words = np.frombuffer(mm, dtype=np.uint64, count=n // 8)
        for a in range(0, len(words), step // 8):
            int(words[a:a + step // 8].sum())
        if d == base:
            fd = os.open(os.path.join(out, name), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            for a in range(0, n, step):
                os.write(fd, mm[a:a + step])
            os.close(fd)
        del words
        mm.close()
"""


def _child_pid(pid: int) -> int | None:
    try:
        for task in Path(f"/proc/{pid}/task").iterdir():   # any thread may have spawned it
            kids = (task / "children").read_text().split()
            if kids:
                return int(kids[0])
    except (OSError, ValueError):
        pass
    return None


def _is_py_spy(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0].endswith(b"py-spy")
    except OSError:
        return False


def _rss_sampler(wrapper_pid: int, out: dict, stop: threading.Event, period: float = 0.02):
    """Peak RssAnon and VmHWM of the measured process (the wrapper's child), every ``period`` s."""
    peak_anon = hwm = 0
    while not stop.is_set():
        # resolved every time: the wrapper's child may not have exec'd yet, and under --profile
        # it is py-spy, whose child is the measured process
        pid = _child_pid(wrapper_pid)
        while pid is not None and _is_py_spy(pid):
            pid = _child_pid(pid)
        if pid is not None:
            out["pid"] = pid
        if pid is not None:
            try:
                with open(f"/proc/{pid}/status") as f:
                    for line in f:
                        if line.startswith("RssAnon:"):
                            peak_anon = max(peak_anon, int(line.split()[1]))
                        elif line.startswith("VmHWM:"):
                            hwm = max(hwm, int(line.split()[1]))
            except (OSError, ValueError):
                pass
        stop.wait(period)
    out["peak_anon_kb"] = peak_anon
    out["sampled_hwm_kb"] = hwm


def run_measured(cmd, env, log_path: Path, timeout: float | None = None) -> dict:
    """Run cmd in a fresh process; its wall time, CPU time and peak memory (see _WRAPPER)."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    res_path = log_path.with_suffix(".rusage.json")
    res_path.unlink(missing_ok=True)
    with open(log_path, "w") as logf:
        t0 = time.perf_counter()
        p = subprocess.Popen([sys.executable, "-S", "-c", _WRAPPER, str(res_path), *map(str, cmd)],
                             env=env, stdout=logf, stderr=subprocess.STDOUT,
                             stdin=subprocess.DEVNULL)
        samp, stop = {}, threading.Event()
        th = threading.Thread(target=_rss_sampler, args=(p.pid, samp, stop), daemon=True)
        th.start()
        try:
            p.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            if samp.get("pid"):
                with contextlib.suppress(OSError):
                    os.kill(samp["pid"], 9)
            p.wait()
        outer = time.perf_counter() - t0
        stop.set()
        th.join()
    try:
        r = json.loads(res_path.read_text())
    except (OSError, ValueError):
        r = {"rc": p.returncode or -1, "wall_s": outer, "maxrss_kb": 0, "user_s": 0.0, "sys_s": 0.0}
    return {
        "rc": r["rc"],
        "wall_s": r["wall_s"],
        "user_s": r["user_s"],
        "sys_s": r["sys_s"],
        "cpu_s": r["user_s"] + r["sys_s"],
        "peak_rss_mb": r["maxrss_kb"] / 1024,       # ru_maxrss is in kB on Linux
        "peak_anon_mb": samp.get("peak_anon_kb", 0) / 1024,
        "log": str(log_path),
    }


def tail(path: str, n: int = 15) -> str:
    try:
        return "".join(Path(path).read_text(errors="replace").splitlines(True)[-n:])
    except OSError:
        return ""


def find_py_spy(venv: Path) -> str | None:
    for c in (shutil.which("py-spy"), venv / "bin" / "py-spy"):
        if c and Path(c).exists():
            return str(c)
    return None


IDLE_FRAMES = ("Condition.wait ", "Event.wait ", "Thread.join ", "_worker (concurrent/futures/thread.py",
               "wait (concurrent/futures/_base.py", "select ", "sleep ")


def summarize_profile(raw: Path, top: int = 20) -> str:
    """Self and inclusive time per Python function from py-spy's collapsed-stack output.

    Percentages are of busy samples: stacks whose innermost frame is a thread waiting for work
    (thread-pool queue, futures, conditions) are counted apart as idle. Native code called from a
    Python line (torch ops, pread) is charged to that line.
    """
    self_t: dict[str, int] = {}
    incl: dict[str, int] = {}
    busy = idle = 0
    for line in raw.read_text(errors="replace").splitlines():
        stack, _, n = line.rpartition(" ")
        if not stack or not n.isdigit():
            continue
        n = int(n)
        frames = [f.strip() for f in stack.split(";")[1:]]   # first entry is the thread/process
        if not frames:
            continue
        if frames[-1].startswith(IDLE_FRAMES):
            idle += n
            continue
        busy += n
        self_t[frames[-1]] = self_t.get(frames[-1], 0) + n
        for f in set(frames):
            incl[f] = incl.get(f, 0) + n
    if not busy:
        return "(no busy samples)"
    out = [f"{busy} busy samples at 50 Hz over all threads ({idle} idle samples not shown)", "",
           "self %  function (file:line)"]
    for f, n in sorted(self_t.items(), key=lambda kv: -kv[1])[:top]:
        out.append(f"{100 * n / busy:6.1f}  {f}")
    out += ["", "incl %  function (file:line)"]
    skip = ("Thread.", "_bootstrap", "<module>", "_run_module", "run (threading", "_worker ")
    rows = [(f, n) for f, n in incl.items() if not f.startswith(skip)]
    for f, n in sorted(rows, key=lambda kv: -kv[1])[:top]:
        out.append(f"{100 * n / busy:6.1f}  {f}")
    return "\n".join(out)


# ---------------------------------------------------------------------------------------------
# comparing outputs
# ---------------------------------------------------------------------------------------------

class Ckpt:
    """Minimal lazy reader over the *.safetensors files of a folder (independent of mergelab)."""

    def __init__(self, d: Path):
        from safetensors import safe_open
        self.files = [safe_open(str(f), framework="pt") for f in sorted(Path(d).glob("*.safetensors"))]
        self.where = {k: f for f in self.files for k in f.keys()}

    def keys(self):
        return sorted(self.where)

    def get(self, k):
        return self.where[k].get_tensor(k)


def compare_exact(a_dir: Path, b_dir: Path) -> dict:
    a, b = Ckpt(a_dir), Ckpt(b_dir)
    ka, kb = set(a.keys()), set(b.keys())
    per, worst, worst_name, dtypes = {}, 0.0, None, set()
    n_diff, n_total, n_diff_tensors = 0, 0, 0
    for k in sorted(ka & kb):
        x, y = a.get(k), b.get(k)
        dtypes.add((str(x.dtype), str(y.dtype)))
        if x.shape != y.shape:
            per[k] = float("inf")
        else:
            diff = (x.float() - y.float()).abs()
            per[k] = float(diff.max()) if x.numel() else 0.0
            nd = int((diff > 1e-6).sum())
            n_diff += nd
            n_diff_tensors += nd > 0
            n_total += x.numel()
        if per[k] > worst or worst_name is None:
            worst, worst_name = per[k], k
    return {"max_abs_diff": worst, "worst_tensor": worst_name, "n_tensors": len(ka & kb),
            "entries_over_1e-6": n_diff, "tensors_over_1e-6": n_diff_tensors, "n_entries": n_total,
            "only_in_mergekit": sorted(ka - kb), "only_in_mergelab": sorted(kb - ka),
            "dtypes": sorted(map(list, dtypes)), "per_tensor": per}


def compare_stats(a_dir: Path, b_dir: Path, base_dir: Path) -> dict:
    """For random methods: compare ||merged - base|| and the kept fraction of the two outputs."""
    a, b, base = Ckpt(a_dir), Ckpt(b_dir), Ckpt(base_dir)
    na = nb = cross = 0.0
    changed_a = changed_b = total = 0
    for k in sorted(set(a.keys()) & set(b.keys())):
        t0 = base.get(k).float()
        da, db = a.get(k).float() - t0, b.get(k).float() - t0
        na += float(da.square().sum())
        nb += float(db.square().sum())
        cross += float((da * db).sum())
        changed_a += int((da != 0).sum())
        changed_b += int((db != 0).sum())
        total += da.numel()
    return {"delta_norm_mergekit": math.sqrt(na), "delta_norm_mergelab": math.sqrt(nb),
            "delta_norm_ratio": math.sqrt(nb / na) if na else float("nan"),
            "delta_cosine": cross / math.sqrt(na * nb) if na and nb else float("nan"),
            "changed_frac_mergekit": changed_a / max(total, 1),
            "changed_frac_mergelab": changed_b / max(total, 1)}


# ---------------------------------------------------------------------------------------------
# table
# ---------------------------------------------------------------------------------------------

def _fmt(x, spec):
    return "-" if x is None else format(x, spec)


def make_table(rows: list[dict]) -> str:
    copies = [r["copy"] for r in rows if r.get("key") in COPY_KEYS and r.get("copy") and r["copy"]["rc"] == 0]
    copy = min(copies, key=lambda c: c["wall_s"]) if copies else None    # the tighter floor
    copy_ok = copy is not None
    hdr = ["method", "mergelab mode", "mergekit s", "mergelab s", "speed-up", "mergelab / fastest copy",
           "mergekit CPU s", "mergelab CPU s", "CPU-time ratio",
           "mergekit peak MB", "mergelab peak MB", "mem ratio", "mergekit anon MB",
           "mergelab anon MB", "agreement"]
    lines = ["| " + " | ".join(hdr) + " |", "|" + "---|" * len(hdr)]
    for r in rows:
        if r.get("key") in COPY_KEYS:
            c = r.get("copy")
            lines.append("| " + " | ".join([
                r["key"], "reference (no torch)" if r["key"] == COPY_KEY else "reference (mmap, numpy)", "-",
                "-" if not c else (f"{c['wall_s']:.1f}" if c["rc"] == 0 else f"FAILED rc={c['rc']}"),
                "-", f"{c['wall_s'] / copy['wall_s']:.2f}x" if c and c["rc"] == 0 and copy_ok else "-", "-",
                "-" if not c else f"{c['cpu_s']:.1f}", "-", "-",
                "-" if not c else f"{c['peak_rss_mb']:.0f}", "-", "-",
                "-" if not c else f"{c['peak_anon_mb']:.0f}", "-"]) + " |")
            continue
        mk, ml = r.get("mergekit"), r.get("mergelab")
        mk_ok = mk and mk["rc"] == 0
        ml_ok = ml and ml["rc"] == 0
        speed = mk["wall_s"] / ml["wall_s"] if mk_ok and ml_ok else None
        mem = ml["peak_rss_mb"] / mk["peak_rss_mb"] if mk_ok and ml_ok else None
        for res in (mk, ml):
            if res and "cpu_s" not in res and "user_s" in res:
                res["cpu_s"] = res["user_s"] + res["sys_s"]
        cpu = mk["cpu_s"] / ml["cpu_s"] if mk_ok and ml_ok and ml["cpu_s"] > 0 else None
        agr = r.get("agreement") or {}
        if "max_abs_diff" in agr:
            a = f"max abs diff {agr['max_abs_diff']:.2e}"
            if agr.get("entries_over_1e-6"):
                a += (f" ({agr['entries_over_1e-6']} of {agr['n_entries']:,} entries > 1e-6, in "
                      f"{agr['tensors_over_1e-6']} of {agr['n_tensors']} tensors)")
            if agr.get("only_in_mergekit") or agr.get("only_in_mergelab"):
                a += " (key sets differ)"
        elif "delta_norm_ratio" in agr:
            a = (f"‖Δ‖ ratio {agr['delta_norm_ratio']:.4f}, changed "
                 f"{agr['changed_frac_mergelab']:.3f} vs {agr['changed_frac_mergekit']:.3f}")
        else:
            a = r.get("agreement_note", "-")
        vs = f" (vs mergekit {r['mergekit_row']})" if r.get("mergekit_row") else ""

        def cell(res, key, spec):
            if not res:
                return "-"
            if res["rc"] != 0:
                return f"FAILED rc={res['rc']}"
            return format(res[key], spec) + ("*" if res.get("reused") else "")

        lines.append("| " + " | ".join([
            r["key"], r["mode"],
            cell(mk, "wall_s", ".1f"), cell(ml, "wall_s", ".1f"),
            _fmt(speed, ".1f") + ("x" if speed else "") + vs,
            f"{ml['wall_s'] / copy['wall_s']:.2f}x" if ml_ok and copy_ok else "-",
            cell(mk, "cpu_s", ".1f"), cell(ml, "cpu_s", ".1f"),
            _fmt(cpu, ".1f") + ("x" if cpu else ""),
            cell(mk, "peak_rss_mb", ".0f"), cell(ml, "peak_rss_mb", ".0f"),
            _fmt(mem, ".2f"),
            cell(mk, "peak_anon_mb", ".0f"), cell(ml, "peak_anon_mb", ".0f"),
            a]) + " |")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# main
# ---------------------------------------------------------------------------------------------

def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size", default="1gb",
                    help="tiny | 100mb | 1gb (248M params) | 4gb (1.0B params) | a parameter "
                         "count such as 500M (default 1gb)")
    ap.add_argument("--models", type=int, default=3, help="number of fine-tunes (default 3)")
    ap.add_argument("--delta", choices=["dense", "sparse"], default="dense",
                    help="fine-tune deltas: dense Gaussian or sparse Gaussian (default dense)")
    ap.add_argument("--delta-scale", type=float, default=0.002,
                    help="std of the deltas (weights have std 0.02; default 0.002)")
    ap.add_argument("--delta-density", type=float, default=0.1,
                    help="fraction of non-zero deltas with --delta sparse (default 0.1)")
    ap.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32",
                    help="dtype of the checkpoints and of the outputs (default float32)")
    ap.add_argument("--seed", type=int, default=0, help="generator seed (default 0)")
    ap.add_argument("--methods", default=",".join(CASE_KEYS),
                    help=f"comma-separated rows among {','.join(CASE_KEYS)}")
    ap.add_argument("--tools", default="mergekit,mergelab",
                    help="comma-separated: mergekit, mergelab (default both)")
    ap.add_argument("--threads", type=int, default=2, help="CPU threads per tool (default 2)")
    ap.add_argument("--device", default="cpu", help="mergelab --device (cpu or cuda)")
    ap.add_argument("--workdir", type=Path, default=REPO / ".cache" / "vs_mergekit",
                    help="checkpoints, outputs, logs and results (default .cache/vs_mergekit)")
    ap.add_argument("--mergekit-venv", type=Path, default=REPO / ".cache" / "mergekit-venv")
    ap.add_argument("--mergekit-args", default="--lazy-unpickle --no-copy-tokenizer "
                    "--no-write-model-card --quiet",
                    help="extra mergekit-yaml options (besides -j THREADS and --random-seed)")
    ap.add_argument("--mergelab-args", default="--quiet", help="extra options for mergelab merge")
    ap.add_argument("--no-install", action="store_true",
                    help="fail instead of installing mergekit when its venv is missing")
    ap.add_argument("--keep-outputs", action="store_true",
                    help="keep merged outputs (default: delete each after comparing)")
    ap.add_argument("--reuse-mergekit", action="store_true",
                    help="keep mergekit's outputs and measurements under WORKDIR and reuse them in "
                         "later runs with the same recipe (mergekit is slow; the table marks "
                         "reused rows)")
    ap.add_argument("--timeout", type=float, default=3600, help="per merge, seconds")
    ap.add_argument("--json", type=Path, default=None,
                    help="results JSON (default WORKDIR/results-SIZE-DTYPE-TOOLS.json)")
    ap.add_argument("--profile", default="",
                    help="comma-separated tools to run under py-spy (50 Hz, all threads); "
                         "writes collapsed stacks and a per-function summary under WORKDIR")
    ap.add_argument("--no-copy-row", action="store_true",
                    help="skip the I/O reference row (a plain read-all-inputs, write-one-checkpoint "
                         "copy in a fresh process, measured first, like a merge)")
    ap.add_argument("--generate-only", action="store_true")
    return ap.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    tools = [t.strip() for t in args.tools.split(",") if t.strip()]
    bad = set(tools) - {"mergekit", "mergelab"}
    if bad or not tools:
        raise SystemExit(f"--tools: unknown {sorted(bad)}; use mergekit and/or mergelab")
    keys = [k.strip() for k in args.methods.split(",") if k.strip()]
    unknown = set(keys) - set(CASE_KEYS)
    if unknown:
        raise SystemExit(f"--methods: unknown {sorted(unknown)}; choose among {CASE_KEYS}")
    cases = [c for c in CASES if c.key in keys]

    def log(msg):
        print(f"[vs_mergekit {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)

    wd = args.workdir.resolve()
    wd.mkdir(parents=True, exist_ok=True)
    ck = generate(wd, args.size, args.models, args.delta, args.delta_scale, args.delta_density,
                  args.dtype, args.seed, log)
    log(f"checkpoints: {ck['n_params']:,} parameters per model ({ck['n_params'] * 4 / 1e9:.2f} GB "
        f"in fp32), base + {args.models} fine-tunes, {args.delta} deltas, {args.dtype}")
    if args.generate_only:
        return 0

    profile_tools = [t.strip() for t in args.profile.split(",") if t.strip()]
    py_spy = None
    if profile_tools:
        py_spy = find_py_spy(args.mergekit_venv)
        if not py_spy:
            raise SystemExit("--profile needs py-spy (pip install py-spy)")
        log("profiling with py-spy: timings and memory of profiled runs include its overhead")
    mk_exe = None
    if "mergekit" in tools:
        if args.no_install and not mergekit_bin(args.mergekit_venv).exists():
            raise SystemExit(f"mergekit venv {args.mergekit_venv} missing and --no-install given")
        mk_exe = ensure_mergekit(args.mergekit_venv.resolve(), log)

    env = dict(os.environ)
    env.update(OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads),
               HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               PYTHONUNBUFFERED="1")
    ml_env = dict(env)
    ml_env["PYTHONPATH"] = os.pathsep.join(
        [str(REPO / "src")] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    mk_env = {k: v for k, v in env.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}

    tag = f"{args.size}-{args.dtype}-{args.delta}"
    run_dir = wd / "runs" / tag
    inputs = [ck["base"], *ck["models"]]
    mk_cache: dict[str, dict] = {}
    rows = []
    if not args.no_copy_row:
        for key, script, extra in ((COPY_KEY, _COPY, []), ("copy-mmap", _COPY_MMAP, [os.pathsep.join(sys.path)])):
            out = run_dir / "out" / key
            shutil.rmtree(out, ignore_errors=True)
            warm = warm_read(inputs)
            log(f"{key} reference (read {len(inputs)} checkpoints, write 1; warm-up read {warm:.1f}s) ...")
            res = run_measured([sys.executable, "-S", "-c", script, *extra, str(out), *map(str, inputs)], env,
                               run_dir / "logs" / f"{key}.log", args.timeout)
            res["warm_read_s"] = warm
            res["bytes_read"] = sum(f.stat().st_size for d in inputs for f in Path(d).iterdir() if f.is_file())
            res["bytes_written"] = sum(f.stat().st_size for f in out.iterdir()) if out.exists() else 0
            log(f"{key}: rc={res['rc']} {res['wall_s']:.1f}s, read {res['bytes_read'] / 1e9:.2f} GB, "
                f"wrote {res['bytes_written'] / 1e9:.2f} GB")
            if res["rc"] != 0:
                log(f"{key} FAILED, log tail:\n{tail(res['log'])}")
            shutil.rmtree(out, ignore_errors=True)
            rows.append({"key": key, "method": "copy", "mode": "reference", "copy": res})
    for case in cases:
        row = {"key": case.key, "method": case.method,
               "mode": "mergekit semantics" if case.compat else "paper semantics",
               "mergekit_row": case.mergekit_row}
        outs = {}
        for tool in tools:
            if tool == "mergekit" and not case.mergekit:
                continue
            rec = write_recipe(run_dir / "recipes" / f"{case.key}-{tool}.yaml",
                               recipe_dict(case, ck, args.dtype, tool == "mergelab"))
            out = run_dir / "out" / f"{case.key}-{tool}"
            cached = run_dir / "out" / f"{case.key}-{tool}.result.json"
            if tool == "mergekit" and args.reuse_mergekit and cached.exists() and out.exists():
                prev = json.loads(cached.read_text())
                if prev.get("recipe") == rec.read_text() and prev.get("rc") == 0:
                    log(f"{case.key}: mergekit result reused from {prev.get('time')}")
                    prev["reused"] = True
                    row[tool] = prev
                    outs[tool] = out
                    continue
            shutil.rmtree(out, ignore_errors=True)
            cached.unlink(missing_ok=True)
            if tool == "mergekit":
                cmd = [str(mk_exe), str(rec), str(out), "-j", str(args.threads),
                       *args.mergekit_args.split()]
                if case.seed is not None:
                    cmd += ["--random-seed", str(case.seed)]
                if args.device != "cpu":
                    cmd += ["--device", args.device]
                e = mk_env
            else:
                cmd = [sys.executable, "-m", "mergelab", "merge", str(rec), str(out), "--force"]
                cmd += ["--compat", "mergekit" if case.compat else "paper"]
                if args.device != "cpu":
                    cmd += ["--device", args.device]
                cmd += args.mergelab_args.split()
                e = ml_env
            prof = None
            if tool in profile_tools:
                prof = run_dir / "profiles" / f"{case.key}-{tool}.txt"
                prof.parent.mkdir(parents=True, exist_ok=True)
                cmd = [py_spy, "record", "--idle", "-r", "50", "-f", "raw", "-o", str(prof),
                       "--", *cmd]
            warm = warm_read(inputs)
            log(f"{case.key}: {tool} (warm-up read {warm:.1f}s) ...")
            load_before = os.getloadavg()
            res = run_measured(cmd, e, run_dir / "logs" / f"{case.key}-{tool}.log", args.timeout)
            res["cmd"] = cmd
            res["warm_read_s"] = warm
            res["time"] = time.strftime("%Y-%m-%d %H:%M:%S")
            res["loadavg_before"] = load_before
            res["loadavg_after"] = os.getloadavg()
            if tool == "mergekit" and args.reuse_mergekit:
                cached.write_text(json.dumps(dict(res, recipe=rec.read_text()), default=str))
            log(f"{case.key}: {tool} rc={res['rc']} {res['wall_s']:.1f}s peak {res['peak_rss_mb']:.0f} MB"
                f" (anon {res['peak_anon_mb']:.0f} MB, cpu {res['user_s'] + res['sys_s']:.1f}s)")
            if prof is not None and prof.exists():
                res["profile"] = str(prof)
                summary = summarize_profile(prof)
                prof.with_suffix(".summary.txt").write_text(summary)
                print(f"\n## profile {case.key} / {tool} ({prof})\n{summary}\n", flush=True)
            if res["rc"] != 0:
                log(f"{case.key}: {tool} FAILED, log tail:\n{tail(res['log'])}")
            row[tool] = res
            outs[tool] = out
        if case.mergekit_row and "mergekit" in tools and "mergekit" not in row:
            row["mergekit"] = mk_cache.get(case.mergekit_row)
        if "mergekit" in row and row["mergekit"] is not None and case.mergekit:
            mk_cache[case.key] = row["mergekit"]
        ok = all(row.get(t) and row[t]["rc"] == 0 for t in ("mergekit", "mergelab"))
        if ok and case.compare != "none" and "mergekit" in outs:
            if case.compare == "exact" and case.compat:
                row["agreement"] = compare_exact(outs["mergekit"], outs["mergelab"])
            else:
                row["agreement"] = compare_stats(outs["mergekit"], outs["mergelab"], ck["base"])
        elif case.compare == "none":
            row["agreement_note"] = case.note
        if not args.keep_outputs:
            for t, o in outs.items():
                if not (t == "mergekit" and args.reuse_mergekit):
                    shutil.rmtree(o, ignore_errors=True)
        rows.append(row)
        partial = args.json or wd / f"results-{tag}-{'+'.join(tools)}.json"
        partial.parent.mkdir(parents=True, exist_ok=True)
        partial.write_text(json.dumps({"partial": True, "rows": rows}, indent=2, default=str))

    try:
        load = os.getloadavg()
    except OSError:
        load = None
    info = {
        "size": args.size, "n_params": ck["n_params"], "models": args.models, "delta": args.delta,
        "dtype": args.dtype, "threads": args.threads, "device": args.device, "tools": tools,
        "cpu_count": os.cpu_count(), "loadavg_end": load, "platform": platform.platform(),
        "mergekit_args": args.mergekit_args, "checkpoint_dir": str(ck["dir"]),
        "time": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    table = make_table(rows)
    print(f"\nmergelab vs mergekit {MERGEKIT_VERSION}: {args.size} = {ck['n_params']:,} params/model, "
          f"base + {args.models} fine-tunes, {args.dtype}, {args.delta} deltas, {args.threads} threads, "
          f"device {args.device}, loadavg {load}\n")
    print(table)
    if any((r.get("mergekit") or {}).get("reused") for r in rows):
        print("\n* mergekit measurement reused from an earlier run (--reuse-mergekit); see JSON "
              "for its time and load average")
    print("peak MB = ru_maxrss of the process (includes resident pages of mmapped inputs); "
          "anon MB = peak RssAnon sampled every 20 ms; mem ratio = mergelab / mergekit peak MB")
    out_json = args.json or wd / f"results-{tag}-{'+'.join(tools)}.json"
    out_json.parent.mkdir(parents=True, exist_ok=True)
    out_json.write_text(json.dumps({"info": info, "rows": rows, "table": table}, indent=2,
                                   default=str))
    print(f"\nresults: {out_json}")
    failed = [r["key"] for r in rows for t in (*tools, "copy") if r.get(t) and r[t]["rc"] != 0]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
