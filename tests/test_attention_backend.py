"""Attention backend choice: the xformers probe and its fallback to SDPA.

xformers cannot run on the CPU CI machine, so a stand-in `xformers.ops` module (installed in
sys.modules for one test) isolates the probe logic: missing package, ops that fail to load (what the
PyPI wheel does under another torch), ops that return wrong numbers, and ops that work.
"""
import logging
import sys
import types

import pytest
import torch

from moca_fast.model import attention as attn
from moca_fast.model.moca import build_model


def _reference_bmhk(q, k, v):
    """Plain softmax attention in xformers' [B, N, H, D] layout."""
    scores = torch.einsum("bnhd,bmhd->bhnm", q, k) / q.shape[-1] ** 0.5
    return torch.einsum("bhnm,bmhd->bnhd", scores.softmax(-1), v)


@pytest.fixture
def fresh_probe(monkeypatch):
    """Forget the process-wide probe result; returns a list recording every fake xformers call."""
    monkeypatch.setattr(attn, "_xformers_status", None)
    return []


def _install_fake_xformers(monkeypatch, calls, fn):
    ops = types.ModuleType("xformers.ops")

    def memory_efficient_attention(q, k, v):
        calls.append(tuple(q.shape))
        return fn(q, k, v)

    ops.memory_efficient_attention = memory_efficient_attention
    pkg = types.ModuleType("xformers")
    pkg.ops = ops
    monkeypatch.setitem(sys.modules, "xformers", pkg)
    monkeypatch.setitem(sys.modules, "xformers.ops", ops)


def test_missing_xformers_falls_back_to_sdpa(monkeypatch, fresh_probe, caplog):
    monkeypatch.setitem(sys.modules, "xformers", None)  # makes `import xformers` raise ImportError
    with caplog.at_level(logging.INFO, logger=attn.__name__):
        assert attn.resolve_backend("auto", device="cpu") == "sdpa"
    assert attn.xformers_status().startswith("unavailable: import failed: ")
    assert "attention backend: sdpa" in caplog.text


def test_ops_that_fail_to_load_fall_back(monkeypatch, fresh_probe, caplog):
    def broken(q, k, v):
        raise NotImplementedError("No operator found for `memory_efficient_attention_forward`\nmore text")

    _install_fake_xformers(monkeypatch, fresh_probe, broken)
    with caplog.at_level(logging.WARNING, logger=attn.__name__):
        assert attn.resolve_backend("xformers", device="cpu") == "sdpa"
    status = attn.xformers_status()
    assert status == "unavailable: call failed: NotImplementedError: No operator found for " \
                     "`memory_efficient_attention_forward`"
    assert "attention=xformers requested but xformers does not run here" in caplog.text
    assert len(fresh_probe) == 1


def test_wrong_numbers_fall_back(monkeypatch, fresh_probe):
    _install_fake_xformers(monkeypatch, fresh_probe, lambda q, k, v: _reference_bmhk(q, k, v) * 1.01)
    assert attn.resolve_backend("auto", device="cpu") == "sdpa"
    assert attn.xformers_status().startswith("unavailable: probe disagrees with SDPA")


def test_working_xformers_is_chosen_once(monkeypatch, fresh_probe):
    _install_fake_xformers(monkeypatch, fresh_probe, _reference_bmhk)
    assert attn.resolve_backend("auto", device="cpu") == "xformers"
    assert attn.resolve_backend("xformers", device="cpu") == "xformers"
    assert attn.xformers_status() == "ok"
    assert len(fresh_probe) == 1, "the probe must run once per process"


def test_sdpa_request_never_probes(monkeypatch, fresh_probe):
    _install_fake_xformers(monkeypatch, fresh_probe, _reference_bmhk)
    assert attn.resolve_backend("sdpa", device="cpu") == "sdpa"
    assert fresh_probe == [] and attn._xformers_status is None


def test_no_cuda_device_needs_no_import(monkeypatch, fresh_probe):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setitem(sys.modules, "xformers", None)
    assert attn.probe_xformers("cuda") == "no CUDA device"


def test_xformers_layout_matches_sdpa(monkeypatch, fresh_probe):
    """The [B, H, N, D] <-> [B, N, H, D] transposes around xformers, on a non-contiguous qkv view."""
    _install_fake_xformers(monkeypatch, fresh_probe, _reference_bmhk)
    B, N, H, D = 3, 7, 2, 8
    qkv = torch.randn(B, N, 3, H, D).permute(2, 0, 3, 1, 4)  # as vit.Attention builds it
    got = attn._xformers_attention(qkv[0], qkv[1], qkv[2])
    want = attn.attention(qkv[0], qkv[1], qkv[2], "sdpa")
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    # CPU tensors always take SDPA, even with the xformers backend selected
    calls = len(fresh_probe)
    attn.attention(qkv[0], qkv[1], qkv[2], "xformers")
    assert len(fresh_probe) == calls


def test_model_exposes_backend_and_sets_every_block(monkeypatch, fresh_probe):
    monkeypatch.setitem(sys.modules, "xformers", None)
    model = build_model("tiny")
    assert model.attention_backend == "sdpa"
    backends = {m.backend for m in model.modules() if hasattr(m, "backend")}
    assert backends == {"sdpa"}


def test_unknown_backend_is_rejected():
    with pytest.raises(ValueError, match="attention='flash' must be"):
        attn.resolve_backend("flash")
