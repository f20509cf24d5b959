// Stand-in for CUDA's <mma.h>: cuda_emu.h, included first, defines what cim's kernels use of it.
#pragma once
