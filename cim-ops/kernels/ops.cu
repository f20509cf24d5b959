// CUDA kernels of cim-ops, one file per op family, compiled as one PTX module by build.rs (the
// `cuda` feature). f32, most also bf16 (the dVAE's map kernels also f16), contiguous row-major
// tensors. Each kernel has a CPU twin in src/<family>.rs; tests/ops_cuda.rs compares them on a GPU,
// and tests/kernels_emulated.rs runs this source on the CPU.

#include "common.cuh"
#include "rows.cu"
#include "respix.cu"
#include "adamw.cu"
#include "attention.cu"
#include "batch_norm.cu"
#include "conv.cu"
#include "max_pool.cu"
#include "bias.cu"
#include "channel.cu"
#include "resample.cu"
#include "heads.cu"
#include "residual.cu"
#include "argmax.cu"
#include "flash.cu"
#include "relu.cu"
