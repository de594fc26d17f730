"""Flat float32 views of a module's state: the one buffer layout that crosses ranks."""

from __future__ import annotations

import zlib
from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class Entry:
    """Where one tensor of the module's state lives inside the flat buffer."""

    name: str
    offset: int
    numel: int
    shape: tuple[int, ...]
    trainable: bool
    batchnorm: bool


class FlatState:
    """Packs a module's floating-point state into one contiguous float32 vector and back.

    Layout: all trainable parameters first (in ``named_parameters`` order), then the floating-point
    buffers (BatchNorm running means/variances). Integer buffers such as ``num_batches_tracked`` are
    never part of the vector, so they are never aggregated. ``vector[:n_trainable]`` is therefore the
    part that cosine similarity and HCA look at; the whole vector is what FedAvg averages.
    """

    def __init__(self, module: nn.Module) -> None:
        bn_prefixes = {
            name
            for name, m in module.named_modules()
            if isinstance(m, nn.modules.batchnorm._BatchNorm)
        }

        def is_bn(full_name: str) -> bool:
            return full_name.rsplit(".", 1)[0] in bn_prefixes if "." in full_name else False

        self._tensors: list[torch.Tensor] = []
        entries: list[Entry] = []
        offset = 0
        for name, p in module.named_parameters():
            entries.append(Entry(name, offset, p.numel(), tuple(p.shape), True, is_bn(name)))
            self._tensors.append(p)
            offset += p.numel()
        self.n_trainable = offset
        for name, b in module.named_buffers():
            if not torch.is_floating_point(b):
                continue
            entries.append(Entry(name, offset, b.numel(), tuple(b.shape), False, is_bn(name)))
            self._tensors.append(b)
            offset += b.numel()
        self.numel = offset
        self.entries = tuple(entries)
        device = self._tensors[0].device if self._tensors else torch.device("cpu")
        mask = torch.zeros(self.numel, dtype=torch.bool, device=device)
        for e in self.entries:
            if e.batchnorm:
                mask[e.offset : e.offset + e.numel] = True
        self.batchnorm_mask = mask

    @property
    def nbytes(self) -> int:
        """Size of the packed vector in bytes."""
        return self.numel * 4

    def pack(self, out: torch.Tensor | None = None) -> torch.Tensor:
        """Copy the module's current state into a flat float32 vector (``out`` if given)."""
        if out is None:
            device = self._tensors[0].device if self._tensors else torch.device("cpu")
            out = torch.empty(self.numel, dtype=torch.float32, device=device)
        elif out.numel() != self.numel:
            raise ValueError(f"buffer has {out.numel()} elements, the layout needs {self.numel}")
        with torch.no_grad():
            for e, t in zip(self.entries, self._tensors, strict=False):
                out[e.offset : e.offset + e.numel].copy_(t.reshape(-1))
        return out

    def unpack(self, flat: torch.Tensor, *, keep_batchnorm: bool = False) -> None:
        """Write a flat vector back into the module (in place); optionally leave BatchNorm alone."""
        if flat.numel() != self.numel:
            raise ValueError(f"vector has {flat.numel()} elements, the layout needs {self.numel}")
        with torch.no_grad():
            for e, t in zip(self.entries, self._tensors, strict=False):
                if keep_batchnorm and e.batchnorm:
                    continue
                t.copy_(flat[e.offset : e.offset + e.numel].view(e.shape))

    def shared_part(self, flat: torch.Tensor, *, local_batchnorm: bool) -> torch.Tensor:
        """The entries every group member must hold identically (all, or all but BatchNorm)."""
        return flat[~self.batchnorm_mask] if local_batchnorm else flat


def checksum(vector: torch.Tensor) -> int:
    """CRC-32 of the vector's bytes: equal exactly when two ranks hold bit-identical backbones."""
    data = vector.detach().to("cpu", torch.float32).contiguous().numpy().tobytes()
    return zlib.crc32(data)
