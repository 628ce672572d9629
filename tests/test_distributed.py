"""distributed.py through torchrun on CPU (gloo): two processes with batch b train exactly like one with 2b.

Each torchrun launch costs ~10 s of process start-up on two cores, so the runs are few and shared:
one single-process run is the reference for a DDP run, an FSDP run and a resume that goes from one
process to two and back. The toy set has 43 pairs: with a global batch of 4, one batch per epoch holds
3, cut 1 + 2 between the ranks, whose means only average to the batch mean when weighted (share).
"""
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import train as T
from tests.helpers import toy_setup

ROOT = Path(__file__).resolve().parents[1]
STEPS = 6  # with grad_accum 2, 11 micro-batches per epoch: the short batch and an epoch change are crossed
ATOL = 1e-5

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed unavailable")


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    return toy_setup(tmp_path_factory.mktemp("toy"), pairs_per_user=11, n_valid_per_user=3, n_unseen_users=1,
                     n_train=43)


def flags(toy, out, **kw):
    """Command-line flags; batch_size is per process."""
    args = dict(model=toy / "base", data=toy / "train.jsonl", valid=toy / "valid.jsonl", out=out, batch_size=4,
                grad_accum=2, lr=1e-3, user_lr=1e-2, warmup_steps=2, max_steps=STEPS, beta=0.1, max_length=96,
                max_prompt_length=32)
    args.update(kw)
    argv = ["--quiet"]
    for k, v in args.items():
        flag = k.replace("_", "-")
        argv += [f"--{flag}"] if v is True else [f"--no-{flag}"] if v is False else [f"--{flag}", str(v)]
    return argv


def config(toy, out, **kw):
    return T.parse_args(flags(toy, out, **kw))


@pytest.fixture(scope="module")
def single(toy):
    """The single-process reference run, global batch 4 (and proof that it never imports distributed.py)."""
    out = toy / "single"
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(sys.modules, "distributed", None)  # `import distributed` would raise ImportError
        T.train(config(toy, out))
    assert not torch.distributed.is_initialized()
    return out


def torchrun(*args, script="train.py", expect_ok=True):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", script, *args]
    # PYTHONFAULTHANDLER: a rank that crashes prints its Python stack
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300,
                       env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONFAULTHANDLER": "1"})
    if expect_ok:
        assert r.returncode == 0, r.stderr[-4000:]
    return r


def losses(run):
    return [json.loads(line)["loss"] for line in (Path(run) / "metrics.jsonl").read_text().splitlines()]


def assert_close_tensors(a_file, b_file):
    a, b = load_file(str(a_file)), load_file(str(b_file))
    assert set(a) == set(b), set(a) ^ set(b)
    for k in a:
        assert a[k].shape == b[k].shape and a[k].dtype == b[k].dtype, k
        assert torch.allclose(a[k].float(), b[k].float(), atol=ATOL, rtol=0), (k, (a[k] - b[k]).abs().max())


def assert_same_run(single, run):
    """Same files; same losses, metrics and weights within float tolerance; same per-user evaluation."""
    assert sorted(p.name for p in Path(single).iterdir()) == sorted(p.name for p in Path(run).iterdir())
    rows_1 = [json.loads(line) for line in (Path(single) / "metrics.jsonl").read_text().splitlines()]
    rows_2 = [json.loads(line) for line in (Path(run) / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows_2] == list(range(1, STEPS + 1))
    for r1, r2 in zip(rows_1, rows_2, strict=True):
        assert r1["epoch"] == r2["epoch"] and r1["lr"] == r2["lr"]
        for k in ("loss", "accuracy", "margin"):
            assert r2[k] == pytest.approx(r1[k], abs=ATOL), (r1["step"], k)
    for name in ("checkpoint/trainable.safetensors", "checkpoint/optimizer.safetensors", "model.safetensors",
                 "user_model.safetensors"):
        assert_close_tensors(Path(single) / name, Path(run) / name)
    state_1, state_2 = (json.loads((Path(r) / "checkpoint" / "state.json").read_text()) for r in (single, run))
    assert state_1 == state_2
    eval_1, eval_2 = (json.loads((Path(r) / "eval.json").read_text()) for r in (single, run))
    assert eval_1.keys() == eval_2.keys() and eval_1["users"].keys() == eval_2["users"].keys()
    for level in ("groups", "users"):
        for key, s1 in eval_1[level].items():
            s2 = eval_2[level][key]
            assert (s2["pairs"], s2["accuracy"]) == (s1["pairs"], s1["accuracy"]), key
            assert s2["mean_margin"] == pytest.approx(s1["mean_margin"], abs=ATOL), key


def test_rank_parts_rebuild_the_global_batch():
    import distributed

    ranks = [distributed.Distributed(rank, 3, "cpu", "ddp") for rank in range(3)]
    full, short, single_pair = list(range(12)), [7, 8, 9, 10], [5]
    assert [d.part_of(full) for d in ranks] == [([0, 1, 2, 3], 4), ([4, 5, 6, 7], 4), ([8, 9, 10, 11], 4)]
    parts = [d.part_of(short) for d in ranks]
    assert sum((p for p, n in parts if n), []) == short and sorted(n for _, n in parts) == [1, 1, 2]
    assert [d.part_of(single_pair) for d in ranks] == [([5], 0), ([5], 0), ([5], 1)]  # two ranks pad, weight 0
    shards = [d.shard(list("abcdefg"), pad="-") for d in ranks]
    assert shards == [list("adg"), list("be-"), list("cf-")]  # as many per rank, every item once


CLOSE = """import os, sys
sys.path.insert(0, {root!r})
import torch
import distributed
os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=sys.argv[1])
d = distributed.join("cpu", sys.argv[2])  # a real process group of one
layers = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 1))
model = torch.nn.Module()
model.layers = layers
d.wrap(model, None, None)
d.wrapped(lambda: model.layers(torch.ones(2, 4)).sum().backward())
del d, model, layers
threads = lambda: sorted(open(f"/proc/self/task/{{t}}/comm").read().strip() for t in os.listdir("/proc/self/task"))
before = threads()
distributed.close()
print(sum("gloo" in t for t in before), sum("gloo" in t for t in threads()))
"""


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="needs /proc to list threads")
@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_close_joins_the_gloo_threads_before_python_shuts_down(tmp_path, parallel):
    """Under FSDP the process group outlived destroy_process_group (DTensor caches keep the device mesh),
    so gloo's worker threads were still running while Python tore down: a rare abort at exit in CI."""
    script = tmp_path / "close.py"
    script.write_text(CLOSE.format(root=str(ROOT)))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    r = subprocess.run([sys.executable, str(script), str(port), parallel], capture_output=True, text=True,
                       timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    before, after = map(int, r.stdout.split())
    assert before > 0 and after == 0, r.stdout  # gloo threads while open; none once closed


@pytest.mark.distributed
@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_two_processes_match_one_with_the_same_global_batch(toy, single, parallel):
    run = toy / parallel
    torchrun(*flags(toy, run, batch_size=2, parallel=parallel))
    assert_same_run(single, run)


STOP_AT = """import sys
sys.path.insert(0, {root!r})
import train
real = train.get_lr
def stop(step, *args):
    if step == {step}:
        raise KeyboardInterrupt  # as Ctrl-C would
    return real(step, *args)
train.get_lr = stop
train.main(sys.argv[1:])
"""


@pytest.mark.distributed
def test_resume_one_to_two_processes_and_back(toy, single, tmp_path, monkeypatch):
    """1 process for steps 1-3, then 2 (FSDP) for 4-5, then 1 again: the same run as `single`."""
    out = tmp_path / "chain"
    real = T.get_lr

    def stop_at_3(step, *args):
        if step == 3:
            raise KeyboardInterrupt
        return real(step, *args)

    monkeypatch.setattr(T, "get_lr", stop_at_3)
    with pytest.raises(SystemExit):
        T.train(config(toy, out))
    monkeypatch.setattr(T, "get_lr", real)

    script = tmp_path / "stop_at_5.py"
    script.write_text(STOP_AT.format(root=str(ROOT), step=5))
    r = torchrun(*flags(toy, out, batch_size=2, parallel="fsdp", resume=True, save_every=1), script=str(script),
                 expect_ok=False)
    assert r.returncode != 0 and "interrupted" in r.stderr, r.stderr[-4000:]
    assert json.loads((out / "checkpoint" / "state.json").read_text())["step"] == 5  # FSDP's step-5 save

    T.train(config(toy, out, resume=True))
    assert losses(out) == pytest.approx(losses(single), abs=ATOL)
    for name in ("checkpoint/trainable.safetensors", "checkpoint/optimizer.safetensors"):
        assert_close_tensors(single / name, out / name)
