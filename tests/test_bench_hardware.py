"""What `mmx bench gpu` measures, checked where no GPU is: FLOP counts, MFU, SDPA backends, host-sync counting."""

import warnings

import pytest
import torch
import torch.nn.functional as F

from mmx.bench.hardware import PEAK_BF16_TFLOPS, count_flops, host_syncs, mfu, peak_tflops, sdpa_backends, sync_sites


def test_flops_of_a_linear_training_step_are_its_three_matmuls():
    layer = torch.nn.Linear(32, 16, bias=False)
    x = torch.randn(8, 32, requires_grad=True)

    def step():
        layer(x).sum().backward()

    # forward 2*B*in*out; backward: the input's and the weight's gradients, as many again each
    assert count_flops(step) == 3 * 2 * 8 * 32 * 16


def test_flops_of_cpu_flash_attention_are_counted_like_the_cuda_kernels():
    b, h, l, s, d = 2, 4, 64, 77, 32
    q = torch.randn(b, h, l, d, requires_grad=True)
    k, v = torch.randn(b, h, s, d), torch.randn(b, h, s, d)
    assert count_flops(lambda: F.scaled_dot_product_attention(q, k, v)) == 4 * b * h * l * s * d  # QK^T and PV
    explicit = count_flops(lambda: (q @ k.transpose(-1, -2)).softmax(-1) @ v)
    assert explicit == 4 * b * h * l * s * d


def test_mfu_is_achieved_flops_over_the_peak():
    assert mfu(989.4e12 * 0.5, 1.0, 989.4) == pytest.approx(0.5)
    assert mfu(1e12, 0.01, 100.0) == pytest.approx(1.0)
    assert mfu(1e12, 0.01, None) is None
    with pytest.raises(ValueError, match="seconds per step must be positive; got 0"):
        mfu(1e12, 0.0, 100.0)


def test_the_peak_comes_from_the_device_name_or_is_given():
    assert peak_tflops("NVIDIA H100 80GB HBM3") == (989.4, "table (H100)")
    assert peak_tflops("NVIDIA H100 PCIe")[0] == 756.0  # the more specific name wins
    assert peak_tflops("NVIDIA H200")[0] == PEAK_BF16_TFLOPS["H200"]
    assert peak_tflops("NVIDIA A100-SXM4-80GB")[0] == 312.0
    assert peak_tflops("Tesla T4") == (None, "unknown device 'Tesla T4': pass --peak-tflops")
    assert peak_tflops("Tesla T4", 65.0) == (65.0, "given")
    with pytest.raises(ValueError, match="must be positive; got -1"):
        peak_tflops("NVIDIA H100", -1.0)


def test_sdpa_backends_name_the_kernel_each_shape_ran():
    from torch.nn.attention import SDPBackend, sdpa_kernel

    q, k = torch.randn(2, 4, 64, 32), torch.randn(2, 4, 77, 32)
    grad_q = q.clone().requires_grad_()

    def calls():
        F.scaled_dot_product_attention(q, k, k)
        F.scaled_dot_product_attention(grad_q, k, k).sum().backward()
        with sdpa_kernel([SDPBackend.MATH]):
            F.scaled_dot_product_attention(q, k, k)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            F.scaled_dot_product_attention(q[:, :, :8], k, k)

    found = {(c.query, c.dtype, c.backend): c.calls for c in sdpa_backends(calls)}
    assert found == {
        ((2, 4, 64, 32), "float32", "flash (CPU)"): 2,
        ((2, 4, 64, 32), "float32", "math"): 1,
        ((2, 4, 8, 32), "bfloat16", "flash (CPU)"): 1,
    }


def test_sync_warnings_are_counted_by_line_and_other_warnings_go_on():
    def fn():
        for _ in range(3):
            warnings.warn("called a synchronizing CUDA operation", UserWarning, stacklevel=1)
        warnings.warn("something else", UserWarning, stacklevel=1)

    with pytest.warns(UserWarning, match="something else"):
        sites = sync_sites(fn)
    assert list(sites.values()) == [3] and next(iter(sites)).startswith(__file__)


def test_host_syncs_say_why_there_is_nothing_to_count_on_a_cpu():
    ran = []
    assert host_syncs(lambda: ran.append(1), torch.device("cpu")) == (
        None,
        "not applicable off CUDA (torch.cuda.set_sync_debug_mode needs a GPU)",
    )
    assert ran == [1]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_host_syncs_see_a_tensor_read_on_cuda():
    x = torch.ones(3, device="cuda")
    sites, problem = host_syncs(lambda: x.sum().item(), torch.device("cuda"))
    assert problem is None and sum(sites.values()) >= 1
