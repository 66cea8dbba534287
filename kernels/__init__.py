"""Fast paths for memsvc's hot loops, each beside the plain-PyTorch reference it must match.

One folder per operation (`kernels/lmm/`: the memory's chunk update), used by
`memsvc.memory` through one dispatch function per operation.
"""
