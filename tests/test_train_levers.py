"""The trainer's speed levers (train.compile, train.fused_adamw) and its host synchronisations: with the levers
off a run is today's run bit for bit (against a plain training loop written here), with them on it stays exact
on resume and equal to float rounding; the training loop reads values from the device only at log intervals."""

from __future__ import annotations

import inspect
import json

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader

from tokenbridge import train as T
from tokenbridge.distributed import ResumableSampler, seed_all
from tokenbridge.optim import EMA, adamw, lr_at, param_groups

from toy_family import ToyGenerator, assert_states_equal, ckpt_of, run_tiny, tiny_config, tiny_dataset


def reference_losses(cfg: dict) -> list[float]:
    """The training loop the trainer runs, written out plainly: seeds, data order, AdamW (multi-tensor), warmup +
    cosine, gradient clipping at 3.0 (the default), EMA; returns every step's loss."""
    t = cfg["train"]
    seed_all(cfg["seed"])
    model = ToyGenerator.from_config(cfg["model"])
    opt = torch.optim.AdamW(param_groups(model, 0.02), lr=t["lr"], betas=(0.9, 0.95), eps=1e-8, foreach=True)
    ema = EMA(model, t["ema"])
    seed_all(cfg["seed"])
    data = tiny_dataset()
    sampler = ResumableSampler(len(data), 1, 0, cfg["seed"])
    gen = torch.Generator()
    loader = DataLoader(data, batch_size=t["global_batch"], sampler=sampler, drop_last=True, generator=gen)
    per_epoch, losses = len(data) // t["global_batch"], []
    for step in range(t["steps"]):
        if step % per_epoch == 0:
            epoch = step // per_epoch
            sampler.set_position(epoch, 0)
            gen.manual_seed(cfg["seed"] * 1_000_003 + epoch * 1009)
            batches = iter(loader)
        for group in opt.param_groups:
            group["lr"] = lr_at(step, t["lr"], t["warmup_steps"], t["steps"], t["min_lr"])
        loss = model.loss(next(batches))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), 3.0)
        opt.step()
        ema.update(model, step)
        losses.append(loss.item())
    return losses


def logged_losses(out_dir) -> list[float]:
    return [json.loads(line)["loss"] for line in (out_dir / "log.jsonl").read_text().splitlines()]


def test_levers_off_is_todays_training_bit_for_bit(tmp_path):
    cfg = tiny_config(tmp_path, compile=False, fused_adamw=False)
    run_tiny(cfg)
    assert logged_losses(tmp_path) == reference_losses(cfg)  # log_every=1: one loss per step, exact


def test_fused_adamw_equals_the_multi_tensor_update():
    torch.manual_seed(0)
    models = [nn.Sequential(nn.Linear(8, 16), nn.LayerNorm(16), nn.Linear(16, 3)) for _ in range(2)]
    models[1].load_state_dict(models[0].state_dict())
    opts = [adamw(param_groups(m, 0.02), 1e-2, (0.9, 0.95), 1e-8, fused=f) for m, f in zip(models, (False, True))]
    assert opts[0].defaults["foreach"] and opts[1].defaults["fused"]
    start = [p.detach().clone() for p in models[0].parameters()]
    x, y = torch.randn(32, 8), torch.randint(0, 3, (32,))
    for _ in range(20):
        for model, opt in zip(models, opts):
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
    for a, b in zip(models[0].parameters(), models[1].parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    moved = max(float((a.detach() - s).abs().max()) for a, s in zip(models[0].parameters(), start))
    assert moved > 0.05  # 20 steps at lr 1e-2 moved the weights: the comparison is not between two copies of init


def test_resume_is_exact_with_the_levers_on(tmp_path):
    levers = {"fused_adamw": True}
    full = tiny_config(tmp_path / "full", **levers)
    m_full = run_tiny(full)
    part = tiny_config(tmp_path / "part", **levers)
    run_tiny(part, stop_at=5)
    m_res = run_tiny(part)
    assert m_res["step"] == m_full["step"] == 10 and m_res["loss"] == m_full["loss"]
    a, b = ckpt_of(tmp_path / "full"), ckpt_of(tmp_path / "part")
    assert_states_equal(a["model"], b["model"])
    assert_states_equal(a["ema"], b["ema"])
    assert a["optimizer"]["param_groups"][0]["fused"]
    off = tiny_config(tmp_path / "off", fused_adamw=False)
    run_tiny(off)  # the fused update moves the weights as the multi-tensor one does, to float rounding
    assert_states_equal(ckpt_of(tmp_path / "off")["model"], a["model"], exact=False)


def test_compile_falls_back_to_eager_with_a_warning(tmp_path, monkeypatch):
    def no_compiler(fn, *args, **kwargs):
        def fail(*a, **k):
            raise RuntimeError("InvalidCxxCompiler: No working C++ compiler found")
        return fail

    monkeypatch.setattr(T.torch, "compile", no_compiler)
    cfg = tiny_config(tmp_path / "compiled", compile=True, steps=4)
    with pytest.warns(UserWarning, match="cannot compile for cpu.*runs eager"):
        run_tiny(cfg)
    run_tiny(tiny_config(tmp_path / "eager", steps=4))
    assert logged_losses(tmp_path / "compiled") == logged_losses(tmp_path / "eager")


def test_training_loop_reads_the_device_only_at_log_intervals(tmp_path, monkeypatch):
    """Every tensor -> Python conversion made by the trainer's own code (tokenbridge/train.py) is counted: with
    log_every=4 over 8 steps that is the two log windows, nothing per step."""
    calls: list[str] = []

    def counting(name):
        original = getattr(torch.Tensor, name)

        def wrapper(self, *args, **kwargs):
            caller = inspect.currentframe().f_back
            if caller is not None and caller.f_code.co_filename == T.__file__:
                calls.append(f"{name} at line {caller.f_lineno}")
            return original(self, *args, **kwargs)
        return wrapper

    for name in ("item", "tolist", "__float__", "__int__", "__bool__", "cpu", "numpy"):
        monkeypatch.setattr(torch.Tensor, name, counting(name))
    run_tiny(tiny_config(tmp_path, steps=8, log_every=4, ckpt_every=0))
    assert len(calls) == 2, calls  # one stats.tolist() per log window
    assert all(c.startswith("tolist") for c in calls)


def test_a_checkpoint_resumes_with_the_update_it_was_written_with(tmp_path):
    """A run checkpointed with the multi-tensor update (every run before train.fused_adamw) and resumed under the
    fused default continues exactly as it would have: the optimizer state records which update it uses."""
    m_full = run_tiny(tiny_config(tmp_path / "full", fused_adamw=False))
    run_tiny(tiny_config(tmp_path / "part", fused_adamw=False), stop_at=5)
    m_res = run_tiny(tiny_config(tmp_path / "part"))  # the default: fused
    assert m_res["loss"] == m_full["loss"]
    part = ckpt_of(tmp_path / "part")
    assert_states_equal(ckpt_of(tmp_path / "full")["model"], part["model"])
    assert part["optimizer"]["param_groups"][0]["foreach"] and not part["optimizer"]["param_groups"][0]["fused"]
