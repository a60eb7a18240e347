"""Precision: "auto" follows the hardware's capability (probed, here replaced by monkeypatching the probe, never
read from this CPU), and the bf16 path works on ANY CPU (forced, on tiny inputs, with tolerances bf16 meets)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import glimr.models.precision as P
from glimr.extract.multiscale import extract
from glimr.models.whiten import attach_whitening, fit_pca_whitening
from glimr.train.trainer import TrainConfigError, amp_context

AVX2_CPUINFO = "processor\t: 0\nflags\t\t: fpu sse sse2 avx avx2 fma\n"
AVX512_BF16_CPUINFO = "processor\t: 0\nflags\t\t: fpu avx2 avx512f avx512bw avx512_bf16 avx512_vnni\n"
AMX_CPUINFO = "processor\t: 0\nflags\t\t: avx2 avx512f amx_tile amx_bf16 amx_int8\n"


@pytest.mark.parametrize(("capability", "cpuinfo", "native"), [
    ("AVX2", AVX2_CPUINFO, False),
    ("AVX512", "processor\t: 0\nflags\t\t: avx2 avx512f avx512bw\n", False),   # AVX-512 without BF16
    ("AVX512", AVX512_BF16_CPUINFO, True),
    ("AVX512", AMX_CPUINFO, True),
    ("AVX512_BF16", "", True),
    ("AMX", "", True),
    ("DEFAULT", "", False),
    ("AVX2", "model name\t: avx512_bf16 in a name is not a flag\n", False),
])
def test_the_probe_reads_the_capability_and_the_cpuinfo_flags(capability, cpuinfo, native):
    assert P.native_bf16(capability, cpuinfo) is native


@pytest.mark.parametrize("native", [True, False])
def test_auto_follows_the_cpu_capability(monkeypatch, native):
    monkeypatch.setattr(P, "cpu_has_native_bf16", lambda: native)
    want = "bf16" if native else "fp32"
    assert P.resolve_precision("auto") == want and P.resolve_precision("auto", "cpu") == want
    assert P.resolve_precision("fp32") == "fp32" and P.resolve_precision("bf16") == "bf16"   # explicit wins
    # the autocast context and the trainer's follow the same decision
    with P.autocast("auto"):
        y = torch.ones(4, 4) @ torch.ones(4, 4)
    assert y.dtype == (torch.bfloat16 if native else torch.float32)
    ctx, scaler = amp_context("auto", torch.device("cpu"))
    with ctx():
        y = torch.ones(4, 4) @ torch.ones(4, 4)
    assert y.dtype == (torch.bfloat16 if native else torch.float32) and scaler is False


def test_bad_precisions_are_refused():
    with pytest.raises(ValueError, match="auto, fp32 or bf16"):
        P.resolve_precision("fp16")
    with pytest.raises(TrainConfigError, match="needs CUDA"):
        amp_context("fp16", torch.device("cpu"))


@pytest.fixture(scope="module")
def images(shared_data):
    return [str(shared_data / "ukbench" / f"ukbench{i:05d}.jpg") for i in (0, 4)]


def test_forced_bf16_extraction_matches_fp32_on_any_cpu(lite0_gem, images):
    """bf16 is emulated on AVX2 CPUs (slow), native on AVX512-BF16/AMX: forced here on 2 small images, so the
    bf16 path runs on every CPU. bf16 keeps 8 bits of mantissa: cosine to the fp32 descriptor > 0.99."""
    kw = {"max_size": 96, "workers": 0, "progress": False, "scales": (1.0,)}
    d32 = extract(lite0_gem, images, precision="fp32", **kw).descriptors
    d16 = extract(lite0_gem, images, precision="bf16", **kw).descriptors
    assert d16.dtype == np.float32 and d16.shape == d32.shape
    np.testing.assert_allclose(np.linalg.norm(d16, axis=1), 1.0, atol=1e-5)     # normalised in fp32
    cos = (d16 * d32).sum(1)
    assert (cos > 0.99).all(), cos
    assert not np.array_equal(d16, d32)      # it did run in bf16: not bit-equal to fp32
    # the two images stay told apart as in fp32
    assert abs(float(d16[0] @ d16[1]) - float(d32[0] @ d32[1])) < 0.02


def test_the_whitening_stage_stays_fp32_under_forced_bf16(images):
    """PCA-whitening amplifies weak directions: it runs in fp32 even inside a bf16 autocast region."""
    from glimr.models.registry import build_model

    net = build_model("gem-lite0")
    rng = np.random.default_rng(0)
    pcaw = fit_pca_whitening(rng.standard_normal((40, net.dim)).astype(np.float32), dim=8)
    attach_whitening(net, pcaw, source="random")
    x = torch.randn(3, 1280, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    with P.autocast("bf16"):
        y = net.pcaw(x)
    xn = torch.nn.functional.normalize(x.double(), dim=1)            # the formula in float64
    ref = torch.nn.functional.normalize((xn - pcaw.mean.double()) @ pcaw.proj.double(), dim=1)
    assert y.dtype == torch.float32
    torch.testing.assert_close(y.double(), ref, atol=1e-5, rtol=0)    # fp32 accuracy, not bf16's 4e-3
