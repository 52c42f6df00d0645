"""The nccl carrier: the gloo carrier's protocol and thread over an NCCL group, with every message
(headers included) in device memory and the payload on the lane's side stream (`staging.run`).

Chosen for CUDA tensors on an NCCL group: ranks on different machines, or one GPU per rank
(`staging.backend_for`). Ranks that share a GPU cannot use NCCL (it refuses two ranks on one
device); they use a gloo group, and their exchanges the `window` carrier (or `gloo-staged`).
"""

from __future__ import annotations

from .gloo import P2PLane


class NcclLane(P2PLane):
    """`P2PLane` on an NCCL group: `protocol.wire_device` puts its messages on the device."""

    kind = "nccl"
