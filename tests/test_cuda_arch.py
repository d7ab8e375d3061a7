"""TORCH_CUDA_ARCH_LIST for DeepSpeed's op builders: the device's plain compute capability when unset."""

from __future__ import annotations

import os

import torch

from livt_ds.cuda_arch import set_plain_cuda_arch_list


def hopper(monkeypatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))


def test_unset_list_becomes_the_plain_capability_of_the_device(monkeypatch):
    monkeypatch.delenv("TORCH_CUDA_ARCH_LIST", raising=False)
    hopper(monkeypatch)
    assert set_plain_cuda_arch_list() == "9.0"
    assert os.environ["TORCH_CUDA_ARCH_LIST"] == "9.0"  # no "a" suffix for DeepSpeed to choke on


def test_a_list_the_user_set_is_kept(monkeypatch):
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
    hopper(monkeypatch)
    assert set_plain_cuda_arch_list() == "8.0;9.0"


def test_without_a_gpu_nothing_is_set(monkeypatch):
    monkeypatch.delenv("TORCH_CUDA_ARCH_LIST", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert set_plain_cuda_arch_list() is None
    assert "TORCH_CUDA_ARCH_LIST" not in os.environ
