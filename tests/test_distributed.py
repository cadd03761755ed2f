"""One stage on several processes (kdrun/distributed.py): 2 CPU processes talking through
gloo train to the weights of one process, only rank 0 writes, a stage whose maths the
shards change keys their number, a killed run resumes, and what several processes
cannot run is refused in one line."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch
import torch.multiprocessing as mp

from kdrun import distributed
from kdrun.data import load_data
from kdrun.distributed import World
from kdrun.errors import ConfigError
from kdrun.losses import build_loss
from kdrun.models import build_model, meta_model
from kdrun.run.validate import check_processes
from kdrun.store.files import load_checkpoint
from kdrun.train.fit import fit
from kdrun.train.shards import on_shards, shard_changes_math
from kdrun.train.targets import CachedLogits, predict_topk
from tests.helpers import assert_float64_weights_agree, make_config

# 216 training examples in batches of 43: five full batches, then one of a single row,
# which leaves the second process without rows (it adds zero gradients).
FIT = ["dataset=synthetic", "dataset.n=300", "trainer.float64=true", "progress=false",
       "trainer.batch_size=43"]
EPOCHS = 3


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def train_student() -> tuple[dict, list[dict], list[torch.Tensor]]:
    """A student distilled for EPOCHS epochs from fixed random teacher logits (KD), in
    float64: its weights, its metric rows, and then its top-2 logits on the training set
    as a teacher's are computed (on every process's shard, then gathered)."""
    cfg = make_config(*FIT)
    data = load_data(cfg.dataset, cfg.split)
    torch.manual_seed(0)
    model = build_model(cfg.student, data.input_shape, data.num_classes)
    logits = torch.randn(len(data.train), data.num_classes,
                         generator=torch.Generator().manual_seed(1))
    rows = []
    fit(model, data, build_loss(cfg.loss), cfg.trainer, stage="distilled", epochs=EPOCHS,
        seed=0, device=torch.device("cpu"), teacher=CachedLogits(logits), progress=False,
        on_epoch=lambda epoch_rows, snapshot: rows.extend(epoch_rows))
    targets = on_shards(lambda split: predict_topk(model, split, 2, batch_size=7),
                        data.train.to("cpu", torch.float64))
    return model.state_dict(), rows, targets


def _one_of_two(rank: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE="2", LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE="2")
    torch.set_num_threads(1)
    distributed.join(distributed.launched_world(), "gloo", timeout_min=2)
    try:
        weights, rows, targets = train_student()
        if rank == 0:
            torch.save({"weights": weights, "rows": rows, "targets": targets}, out)
    finally:
        distributed.leave()
    # About 1 exit in 40, gloo's threads abort the interpreter's finalisation after a
    # clean leave ("terminate called without an active exception", SIGABRT): this test is
    # about the weights, which are saved by now, so the process ends without finalising.
    os._exit(0)


def test_two_gloo_processes_train_to_the_weights_of_one_in_float64(tmp_path):
    # The bound is tests/helpers.py's FLOAT64_WEIGHT_BOUND: the shards' gradients are the
    # same terms summed in another order (two partial sums, then gloo's sum), a rounding
    # difference of ~1e-15 per step; Adam amplifies it at most 1/eps (see the helper).
    alone_weights, alone_rows, alone_targets = train_student()
    mp.spawn(_one_of_two, args=(free_port(), str(tmp_path / "two.pt")), nprocs=2)
    two = torch.load(tmp_path / "two.pt", weights_only=True)
    largest = assert_float64_weights_agree(two["weights"], alone_weights, "2 processes vs 1")
    print(f"largest weight difference, 2 processes vs 1: {largest:.1e}")
    assert len(two["rows"]) == len(alone_rows) == EPOCHS * 3  # train, val, test
    for ours, theirs in zip(two["rows"], alone_rows):  # loss and accuracy over every shard
        assert (ours["epoch"], ours["split"]) == (theirs["epoch"], theirs["split"])
        assert ours["score"] == pytest.approx(theirs["score"], abs=1e-9)
        assert ours["loss"] == pytest.approx(theirs["loss"], rel=1e-9)
    values, indices, rest = two["targets"]  # 216 rows: 108 per process, put back in order
    assert torch.equal(indices, alone_targets[1])
    assert torch.allclose(values, alone_targets[0], rtol=0, atol=1e-9)
    assert torch.allclose(rest, alone_targets[2], rtol=0, atol=1e-9)


def test_shards_cover_the_rows_in_order_and_differ_by_one_row_at_most():
    shards = [World(rank=r, size=3).shard(8) for r in range(3)]
    assert [(s.start, s.stop) for s in shards] == [(0, 3), (3, 6), (6, 8)]
    assert [World(rank=r, size=2).shard(1) for r in range(2)] == [slice(0, 1), slice(1, 1)]


@pytest.mark.parametrize("overrides, reason", [
    ((), None),
    (("student=cnn",), None),
    (("student.dropout=0.2",), "dropout masks"),
    (("student=resnet8",), "batch norm"),
    (("loss=rkd",), "not a mean of per-row terms"),
])
def test_a_stage_whose_maths_the_shards_change_says_why(overrides, reason):
    cfg = make_config("dataset=digits", *overrides)
    shape, classes = (1, 8, 8), 10
    said = shard_changes_math(meta_model(cfg.student, shape, classes), build_loss(cfg.loss),
                              all_labelled=True)
    assert said is None if reason is None else reason in said
    if reason is None:
        assert "labelled" in shard_changes_math(meta_model(cfg.student, shape, classes),
                                                build_loss(cfg.loss), all_labelled=False)


@pytest.mark.parametrize("overrides, key, valid", [
    (("trainer.batch_size=2",), "trainer.batch_size", "use at least 3"),
    (("trainer.batch_size=64",), "trainer.batch_size", "multiple of 3"),
    (("loss=crd", "trainer.batch_size=99"), "loss.name", "run it in one process"),
    (("device=cuda:1", "trainer.batch_size=99"), "device", "use device=cuda or auto"),
    (("distributed.backend=nccl", "device=cpu", "trainer.batch_size=99"), "distributed.backend",
     "use gloo"),
    (("scheme=data_free", "trainer.batch_size=99"), "scheme.name", "start kdrun without torchrun"),
])
def test_what_several_processes_cannot_run_is_refused_naming_the_key(overrides, key, valid):
    with pytest.raises(ConfigError) as error:
        check_processes(make_config(*overrides), World(rank=0, size=3))
    message = str(error.value)
    assert key in message and valid in message and "\n" not in message


def test_check_processes_gives_gloo_on_a_cpu():
    assert check_processes(make_config("device=cpu"), World(rank=1, size=2)) == "gloo"


def test_a_sweep_under_torchrun_is_refused_in_one_line(tmp_path):
    env = {**os.environ, "TORCHELASTIC_RUN_ID": "test", "WORLD_SIZE": "2", "RANK": "0"}
    proc = subprocess.run([sys.executable, "-m", "kdrun", "-m", "loss.T=2,4"], cwd=tmp_path,
                          env=env, text=True, capture_output=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.startswith("kdrun: error: kdrun -m under torchrun")
    assert "tasks_per_node" in proc.stderr and proc.stderr.count("\n") == 1
    assert not (tmp_path / "outputs").exists()


# ---------------------------------------------------------------- torchrun end to end

TORCHRUN = str(Path(sys.executable).parent / "torchrun")
RUN = ["device=cpu", "progress=false", "repeats=1", "dataset.unlabeled=0", "split.max_train=1000",
       "split.max_test=300", "trainer.epochs=4", "trainer.checkpoint_every=1"]


def torchrun(cwd: Path, *args: str, processes: int = 2, wait: bool = True):
    """``torchrun -m kdrun ARGS`` in ``cwd``, whose tmp/ is the processes' temporary folder."""
    command = [TORCHRUN, f"--nproc_per_node={processes}", "--master_port", str(free_port()),
               "-m", "kdrun", *args]
    (cwd / "tmp").mkdir(exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TMPDIR": str(cwd / "tmp")}
    if not wait:
        return subprocess.Popen(command, cwd=cwd, env=env, text=True, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, start_new_session=True)
    return subprocess.run(command, cwd=cwd, env=env, text=True, capture_output=True, timeout=300)


def run_folders(cwd: Path) -> list[Path]:
    return sorted(p.parent for p in (cwd / "outputs" / "runs").rglob("summary.csv"))


@pytest.mark.slow
def test_torchrun_two_processes_only_rank_0_writes_and_the_cache_serves_one_process(tmp_path):
    proc = torchrun(tmp_path, *RUN)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.stdout.count("kdrun | dataset=") == 1  # one table: rank 0's
    (run,) = run_folders(tmp_path)
    left = [p.name for p in (tmp_path / "tmp").iterdir() if p.name.startswith("kdrun")]
    assert not left  # the second process's temporary folders are gone (torch's own stay)
    summary = pd.read_csv(run / "summary.csv")
    assert set(summary.processes) == {2} and set(summary.backend) == {"gloo"}
    one = subprocess.run([sys.executable, "-m", "kdrun", *RUN], cwd=tmp_path, text=True,
                         capture_output=True, timeout=300)
    assert one.returncode == 0, one.stderr[-3000:]
    again = pd.read_csv(run_folders(tmp_path)[-1] / "summary.csv")
    assert again.reused.all()  # the default pair: no batch norm, no dropout, a per-row loss
    assert list(again.cache_key) == list(summary.cache_key)


def child_pids(pid: int) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout
    return [int(p) for p in out.split()]


@pytest.mark.slow
def test_a_killed_two_process_run_resumes_to_the_uninterrupted_result(tmp_path):
    long = [*RUN, "trainer.teacher_epochs=60", "trainer.student_epochs=1", "trainer.float64=true"]
    full = tmp_path / "full"
    full.mkdir()
    assert torchrun(full, *long).returncode == 0
    cut = tmp_path / "cut"
    cut.mkdir()
    proc = torchrun(cut, *long, wait=False)
    deadline = time.time() + 120
    while not list((cut / "outputs" / "cache").glob("*/state.pt")):
        assert time.time() < deadline and proc.poll() is None, proc.stdout.read()
        time.sleep(0.05)
    time.sleep(0.5)
    ranks = child_pids(proc.pid)
    assert len(ranks) == 2
    os.kill(ranks[-1], signal.SIGKILL)  # one process dies; torchrun stops the other
    proc.wait(timeout=60)
    assert proc.returncode != 0
    resumed = torchrun(cut, *long)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    events = pd.read_json(run_folders(cut)[-1] / "events.jsonl", lines=True)
    assert "resumed" in set(events[events.stage == "teacher"].event), events
    for role in ("teacher", "scratch", "distilled"):
        ours = load_checkpoint(run_folders(cut)[-1] / "checkpoints" / f"{role}.pt")["model"]
        theirs = load_checkpoint(run_folders(full)[0] / "checkpoints" / f"{role}.pt")["model"]
        for name, tensor in theirs.items():
            assert torch.equal(ours[name], tensor), (role, name)


@pytest.mark.slow
def test_a_submitit_job_of_two_tasks_trains_on_two_processes(tmp_path):
    # submitit's local executor: the code path of a Slurm job with tasks_per_node=2
    sweep = tmp_path / "sweep"
    proc = subprocess.run([sys.executable, "-m", "kdrun", "-m", "hydra/launcher=submitit_local",
                           "hydra.launcher.tasks_per_node=2", *RUN, f"hydra.sweep.dir={sweep}"],
                          cwd=tmp_path, text=True, capture_output=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    (run,) = [p.parent for p in sweep.rglob("done.json")]
    summary = pd.read_csv(run / "summary.csv")
    assert set(summary.processes) == {2} and set(summary.backend) == {"gloo"}
    assert (run / "kdrun.log").read_text().count("kdrun | dataset=") == 1  # rank 0's table
