"""The memory's operations, each a folder laid out as flash-linear-attention lays them out:
a plain reference (`naive.py`), the fast paths beside it, and one dispatch function.

`kernels.lmm`: the chunk update of the MLP memory (reference, PyTorch, Triton);
`kernels.delta_rule`: the exact gated delta rule of a matrix memory;
`kernels.decode_step`: one MAG block's decode step in C++ for the CPU (its reference is
the eager step of memsvc/model/decode.py, which calls it). This package
imports nothing from memsvc (tests/kernels/test_layering.py): memsvc -> kernels.
"""
