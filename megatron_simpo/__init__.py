"""megatron-simpo: SimPO preference alignment in NVIDIA Megatron-Core.

Importing the package installs, before any Megatron-Core import, the finder that serves inert
stand-ins for Megatron-Core 0.18+'s triton-only modules on machines without CUDA and triton
(:mod:`megatron_simpo.platform.triton_stand_ins`; it imports nothing until asked). Everything
else in the CPU layer is explicit: :func:`megatron_simpo.platform.cpu.activate`.
"""

from megatron_simpo.platform import triton_stand_ins

triton_stand_ins.install()
