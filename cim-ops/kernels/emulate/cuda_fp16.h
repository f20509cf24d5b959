// Stand-in for CUDA's <cuda_fp16.h>: cuda_emu.h, included first, defines what cim's kernels use of it.
#pragma once
