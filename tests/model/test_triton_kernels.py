"""sg2dist/model/triton_kernels.py compiles for the GPUs it is meant for.

The other Triton tests run the kernels in Triton's interpreter, which executes them as
Python and accepts constructs the compiler would refuse. Here Triton's own compiler (with
the ptxas its wheel ships) builds each kernel for an sm_90 GPU (H100, H200) down to a
cubin, in every dtype and variant training uses, so a GPU session never meets a kernel that
does not compile. No GPU is needed: nothing is launched.
"""

from __future__ import annotations

import importlib
import os
import sys

import pytest

triton = pytest.importorskip("triton")

SM90 = ("cuda", 90, 32)  # backend, compute capability, warp size
POINTER_DTYPES = {"f_ptr": "fp32"}  # the FIR taps are float32 whatever the activations


@pytest.fixture(scope="module")
def compiled_kernels(tmp_path_factory):
    """triton_kernels as a compiled (not interpreted) module, with Triton's compile cache in
    a temporary folder (nothing left in the home folder, nothing reused from an earlier run)."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("TRITON_INTERPRET=1 is set for the whole session")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("TRITON_CACHE_DIR", str(tmp_path_factory.mktemp("triton-cache")))
        # A fresh import: an earlier test may have imported the module interpreted.
        sys.modules.pop("sg2dist.model.triton_kernels", None)
        module = importlib.import_module("sg2dist.model.triton_kernels")
        assert not module.INTERPRETED
        yield module


def compile_for_sm90(kernel, dtype: str, constexprs: dict) -> bytes:
    """The cubin of `kernel` with its pointers to `dtype` and the given constexprs."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    signature = {}
    for param in kernel.params:
        if param.is_constexpr:
            signature[param.name] = "constexpr"
        elif param.name.endswith("_ptr"):
            signature[param.name] = "*" + POINTER_DTYPES.get(param.name, dtype)
        else:
            signature[param.name] = "fp32" if param.name == "clamp" else "i32"
    source = ASTSource(fn=kernel, signature=signature, constexprs=constexprs)
    return triton.compile(source, target=GPUTarget(*SM90)).asm["cubin"]


@pytest.mark.parametrize("dtype", ["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("channels_last", [False, True])
def test_every_triton_kernel_compiles_for_an_sm90_gpu(compiled_kernels, dtype, channels_last):
    k = compiled_kernels
    epilogues = [  # a synthesis layer (everything), then toRGB (bias and clamp only)
        dict(HAS_SCALE=True, HAS_NOISE=True, NOISE_PER_SAMPLE=True, HAS_BIAS=True, LRELU=True),
        dict(HAS_SCALE=False, HAS_NOISE=False, NOISE_PER_SAMPLE=False, HAS_BIAS=True, LRELU=False),
    ]
    for epilogue in epilogues:
        constexprs = dict(
            epilogue,
            SLOPE=k.LRELU_SLOPE,
            HAS_CLAMP=True,
            CHANNELS_LAST=channels_last,
            BLOCK=k.BLOCK,
            ACC_F64=False,
        )
        assert compile_for_sm90(k._bias_act_kernel, dtype, constexprs)
    masks = dict(LRELU=True, SLOPE=k.LRELU_SLOPE, HAS_CLAMP=True, BLOCK=k.BLOCK)
    assert compile_for_sm90(k._act_grad_kernel, dtype, masks)
    for up, down, pad in [(2, 1, 2), (1, 2, 1), (1, 1, 1)]:  # upsample, downsample, blur
        resample = dict(UP=up, DOWN=down, PAD=pad, K=4, BLOCK=k.BLOCK, ACC_F64=False)
        assert compile_for_sm90(
            k._upfirdn2d_kernel, dtype, dict(resample, CHANNELS_LAST=channels_last)
        )
