"""Faults at checkpoint time, for real: a process SIGKILLed between the writes of a checkpoint,
a disk that refuses the write, weights that blew up while the loss stayed finite.

The kills happen in a child process (``python -c``) that replaces ``os.replace`` or
``os.unlink`` with a wrapper sending itself SIGKILL at a chosen file; the parent then reads
what is on disk the way ``train --resume``, ``resetnet eval`` and ``load_model`` do.
"""

from __future__ import annotations

import errno
import json
import os
import re
import signal
import subprocess
import sys
import textwrap

import pytest
import torch

import resetnet
from helpers import random_arrays
from resetnet.checkpoint import CHECKPOINT_JSON, CheckpointError, rng_state, save_checkpoint
from resetnet.train import NonFiniteLoss, load_model, read_checkpoint, train
from resetnet.train.config import load_config, merge

MODEL = "reset_t3_2cu3it"

# Runs in the child: install the kill hook, then save (or train).
CHILD = textwrap.dedent(
    r"""
    import json, os, re, signal, sys
    args = json.loads(sys.argv[1])
    import numpy as np
    import torch
    torch.set_num_threads(1)

    real = getattr(os, args["fn"])
    def hooked(*a, **kw):
        dst = os.fspath(a[-1] if args["fn"] == "replace" else a[0])
        if re.fullmatch(args["kill_at"], os.path.basename(dst)):
            os.kill(os.getpid(), signal.SIGKILL)  # no cleanup, no finally: as a power cut or the OOM killer
        return real(*a, **kw)
    setattr(os, args["fn"], hooked)

    if args["mode"] == "save":
        import resetnet
        from resetnet.checkpoint import save_checkpoint
        from resetnet.train.config import load_config
        torch.manual_seed(args["step"])
        model = resetnet.create_model(args["model"])
        cfg = load_config({"model": {"name": args["model"]}})
        save_checkpoint(args["run_dir"], model, {"config": cfg, "step": args["step"]})
    else:
        from resetnet.train import train
        rng = np.random.default_rng(0)
        arrays = {k: (rng.integers(0, 256, (n, 8, 8, 3), dtype=np.uint8), rng.integers(0, 10, n)) for k, n in (("train", 64), ("test", 32))}
        train(args["config"], args["run_dir"], arrays=arrays)
    print("not killed")
    """
)


def _child(**args):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-c", CHILD, json.dumps(args)], capture_output=True, text=True, timeout=300, env=env)


def _model(seed):
    torch.manual_seed(seed)
    return resetnet.create_model(MODEL)


def _meta(step):
    return {"config": load_config({"model": {"name": MODEL}}), "step": step, "rng": rng_state()}


def _tiny(**updates):
    base = {
        "model": {"name": MODEL, "overrides": {}},
        "train": {
            "batch_size": 16,
            "steps": 6,
            "eval_every": 0,
            "eval_batch_size": 32,
            "log_every": 1,
            "route_log_every": 0,
            "checkpoint_every": 2,
            "progress": False,
            "tensorboard": False,
        },
    }
    return merge(base, updates)


def _names(run_dir):
    return sorted(p.name for p in run_dir.iterdir())


# Where the child dies while saving step 2 over a step-1 checkpoint, and the step read back:
# os.replace of the pointer (the new pair is complete, not committed), os.unlink of the old
# pair (committed). A kill between the two files of a pair: test_sigkill_during_training_then_resume.
KILLS = {
    "before the pointer switch": ("replace", re.escape(CHECKPOINT_JSON), 1),
    "while deleting the old pair": ("unlink", r"checkpoint-1-\w+\.json", 2),
}


@pytest.mark.parametrize("where", list(KILLS))
def test_sigkill_during_a_save_keeps_a_complete_checkpoint(tmp_path, where):
    fn, kill_at, expected = KILLS[where]
    save_checkpoint(tmp_path, _model(1), _meta(1))
    proc = _child(mode="save", fn=fn, kill_at=kill_at, run_dir=str(tmp_path), step=2, model=MODEL)
    assert proc.returncode == -signal.SIGKILL, proc.stdout + proc.stderr[-3000:]
    assert len(_names(tmp_path)) > 3  # the interrupted save left files behind

    ckpt = read_checkpoint(tmp_path)  # no warning needed: the pointer names a complete pair
    assert ckpt.meta["step"] == expected
    model, meta = load_model(tmp_path)
    assert meta["step"] == expected and torch.equal(model.fc.weight, _model(expected).fc.weight)

    save_checkpoint(tmp_path, _model(3), _meta(3))  # the next save clears the leftovers
    assert len(_names(tmp_path)) == 3 and read_checkpoint(tmp_path).meta["step"] == 3


def test_sigkill_during_training_then_resume(tmp_path):
    """A run killed between the two files of its step-4 checkpoint resumes from step 2."""
    cfg = _tiny()
    proc = _child(mode="train", fn="replace", kill_at=r"checkpoint-4-\w+\.json", run_dir=str(tmp_path), config=cfg)
    assert proc.returncode == -signal.SIGKILL, proc.stdout + proc.stderr[-3000:]
    assert read_checkpoint(tmp_path).meta["step"] == 2
    assert load_model(tmp_path)[1]["step"] == 2
    summary = train(cfg, tmp_path, arrays=random_arrays(), resume=True)
    assert summary["status"] == "completed" and summary["step"] == 6
    assert read_checkpoint(tmp_path).meta["step"] == 6
    assert len([n for n in _names(tmp_path) if n.startswith("checkpoint") or n.startswith(".checkpoint")]) == 3


def test_file_too_large_at_save_time(tmp_path):
    """A real write failure as root too: RLIMIT_FSIZE makes write() fail with EFBIG."""
    pytest.importorskip("resource")
    code = textwrap.dedent(
        r"""
        import json, resource, signal, sys
        import torch
        import resetnet
        from resetnet.checkpoint import CheckpointError, save_checkpoint
        from resetnet.train.config import load_config
        run_dir = sys.argv[1]
        cfg = load_config({"model": {"name": "reset_t3_2cu3it"}})
        model = resetnet.create_model("reset_t3_2cu3it")
        save_checkpoint(run_dir, model, {"config": cfg, "step": 1})
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # else the kernel kills the writer
        resource.setrlimit(resource.RLIMIT_FSIZE, (4096, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
        try:
            save_checkpoint(run_dir, model, {"config": cfg, "step": 2})
        except CheckpointError as err:
            print(json.dumps({"error": str(err)}))
        """
    )
    proc = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"}
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    message = json.loads(proc.stdout.strip().splitlines()[-1])["error"]
    assert re.fullmatch(
        rf"cannot save the checkpoint of step 2: writing {re.escape(str(tmp_path))}/checkpoint-2-\w+\.safetensors failed: "
        r"File too large; the previous checkpoint was kept",
        message,
    ), message
    assert len(_names(tmp_path)) == 3 and read_checkpoint(tmp_path).meta["step"] == 1  # no temp file, no half pair


def test_a_file_where_the_run_directory_should_be(tmp_path):
    (tmp_path / "run").write_text("not a directory")
    with pytest.raises(CheckpointError, match=r"cannot save the checkpoint of step 1: creating .*run failed: File exists; no checkpoint was written"):
        save_checkpoint(tmp_path / "run", _model(1), _meta(1))


def test_read_only_directory_at_save_time(tmp_path):
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        pytest.skip("root ignores permission bits (test_file_too_large_at_save_time and the ENOSPC test cover write failures)")
    save_checkpoint(tmp_path, _model(1), _meta(1))
    before = _names(tmp_path)
    tmp_path.chmod(0o555)
    try:
        with pytest.raises(
            CheckpointError, match=r"writing .*checkpoint-2-\w+\.safetensors failed: Permission denied; the previous checkpoint was kept"
        ):
            save_checkpoint(tmp_path, _model(2), _meta(2))
    finally:
        tmp_path.chmod(0o755)
    assert _names(tmp_path) == before and read_checkpoint(tmp_path).meta["step"] == 1


def test_blown_up_buffers_with_a_finite_loss_are_not_checkpointed(tmp_path):
    """BN running statistics are Inf (as after a huge learning rate) while the training loss,
    computed with batch statistics, is finite: the step-4 checkpoint is refused, step 2 kept."""

    class Poison:
        def on_step_end(self, trainer, step, stats):
            if step == 3:
                with torch.no_grad():
                    for name, buf in trainer.model.named_buffers():
                        if name.endswith("running_var"):
                            buf.fill_(float("inf"))

    with pytest.raises(
        NonFiniteLoss,
        match=r"non-finite weights at step 4: \d+ of \d+ model/optimizer tensors hold NaN/Inf "
        r"\(first: model/\S+running_var, .*\); the checkpoint was not written, the previous checkpoint in .* was kept\. "
        r"Lower optim.lr or set optim.grad_clip",
    ) as info:
        train(_tiny(), tmp_path, arrays=random_arrays(), callbacks=[Poison()])
    assert info.value.step == 4 and all(n.startswith("model/") and n.endswith("running_var") for n in info.value.tensors)
    assert read_checkpoint(tmp_path).meta["step"] == 2 and load_model(tmp_path)[1]["step"] == 2
    summary = train(_tiny(), tmp_path, arrays=random_arrays(), resume=True)  # --resume works from the kept checkpoint
    assert summary["status"] == "completed" and summary["step"] == 6


def test_enospc_at_the_pointer_switch(tmp_path, monkeypatch):
    """The disk fills up at the last write: the new pair is dropped, the previous one stays current."""
    save_checkpoint(tmp_path, _model(1), _meta(1))
    before = {n: (tmp_path / n).read_bytes() for n in _names(tmp_path)}
    real = os.replace

    def replace(src, dst):
        if os.path.basename(dst) == CHECKPOINT_JSON:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(
        CheckpointError,
        match=rf"writing {re.escape(str(tmp_path / CHECKPOINT_JSON))} failed: No space left on device; the previous checkpoint was kept",
    ):
        save_checkpoint(tmp_path, _model(2), _meta(2))
    monkeypatch.undo()
    assert {n: (tmp_path / n).read_bytes() for n in _names(tmp_path)} == before
    assert read_checkpoint(tmp_path).meta["step"] == 1
