"""Time AIHWKIT-Lightning's AnalogLinear on one SwiGLU expert, settings matched to aimc's
`standard-hwa` preset, for the comparison of issue 5 with `aimc bench --suite gpu --shapes expert`.

The expert: y = down(silu(g) * u) with [g | u] = gate_up(x); x is [T, d] = [2048, 2048] (one
OLMoE expert's share of a 16384-token batch at k = 8 of E = 64), gate_up d -> 2n, down n -> d,
n = 1024. Matched: 8-bit DAC over a static input range of 1 (aimc: constant noise management 1,
DAC 8 bits), 8-bit ADC with bound 10, output noise 0.04, crossbars of 512 rows. Not in
Lightning's forward and so absent from its timing: PCM_READ weight noise and IR drop (aimc's
standard-hwa has both; `--gpu-preset` can drop them for a like-for-like run).

Runs on the GPU machine beside PyTorch and Triton (no internet): install the wheel carried in
.dev/wheels with `pip install --no-deps --target /tmp/ahl <wheel>` and put /tmp/ahl on
PYTHONPATH. Prints one JSON line: medians over --repeats timed runs (CUDA events, after
warm-up) of Lightning's expert in float32 and, as the in-run reference, the same two products as
bf16 torch.nn.functional.linear (cuBLAS). Lightning draws output noise only in training mode, so
it is timed twice: `eval` (DAC/ADC, no noise) and `train` (with output noise, under no_grad).
"""
import argparse
import json
import os

os.environ.setdefault("AIHWKIT_USE_TRITON", "1")
# Lightning 2.1.0's Triton kernels read a module-level float (FLOAT32_TINY); Triton 3.6 refuses
# non-constexpr globals unless this is set.
os.environ.setdefault("TRITON_ALLOW_NON_CONSTEXPR_GLOBALS", "1")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from aihwkit_lightning.nn import AnalogLinear  # noqa: E402
from aihwkit_lightning.simulator.configs import TorchInferenceRPUConfig  # noqa: E402


def rpu_config(rows: int) -> TorchInferenceRPUConfig:
    cfg = TorchInferenceRPUConfig()
    cfg.forward.inp_res = 2**8 - 2
    cfg.forward.out_res = 2**8 - 2
    cfg.forward.out_bound = 10.0
    cfg.forward.out_noise = 0.04
    cfg.mapping.max_input_size = rows
    cfg.pre_post.input_range.enable = True
    cfg.pre_post.input_range.learn_input_range = False
    cfg.pre_post.input_range.init_value = 1.0
    cfg.pre_post.input_range.init_from_data = 0
    return cfg


def median_ms(fn, warmup: int, repeats: int) -> float:
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    times.sort()
    return times[len(times) // 2]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--d", type=int, default=2048)
    ap.add_argument("--n", type=int, default=1024)
    ap.add_argument("--rows", type=int, default=512, help="crossbar rows (max_input_size)")
    ap.add_argument("--repeats", type=int, default=21)
    args = ap.parse_args()
    dev = torch.device("cuda")
    torch.manual_seed(0)
    t, d, n = args.tokens, args.d, args.n
    cfg = rpu_config(args.rows)
    gate_up = AnalogLinear(d, 2 * n, bias=False, rpu_config=cfg).to(dev).eval()
    down = AnalogLinear(n, d, bias=False, rpu_config=cfg).to(dev).eval()
    x = (torch.randn(t, d, device=dev) * 0.3).clamp(-1, 1)

    @torch.no_grad()
    def lightning():
        gu = gate_up(x)
        g, u = gu[:, :n], gu[:, n:]
        return down(F.silu(g) * u)

    w_gu = gate_up.weight.detach().to(torch.bfloat16)
    w_dn = down.weight.detach().to(torch.bfloat16)
    xb = x.to(torch.bfloat16)

    @torch.no_grad()
    def cublas():
        gu = F.linear(xb, w_gu)
        return F.linear(F.silu(gu[:, :n]) * gu[:, n:], w_dn)

    y = lightning()
    assert torch.isfinite(y).all(), "Lightning expert produced non-finite outputs"
    flops = 2.0 * t * d * 2 * n + 2.0 * t * n * d
    ms_l = median_ms(lightning, 3, args.repeats)
    gate_up.train()
    down.train()
    ms_noisy = median_ms(lightning, 3, args.repeats)
    ms_c = median_ms(cublas, 3, args.repeats)
    print(json.dumps({
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "shape": {"T": t, "d": d, "n": n, "crossbar_rows": args.rows},
        "lightning_f32_ms": ms_l,
        "lightning_tflops": flops / ms_l / 1e9,
        "cublas_bf16_ms": ms_c,
        "cublas_tflops": flops / ms_c / 1e9,
        "lightning_over_cublas": ms_l / ms_c,
        "lightning_f32_with_out_noise_ms": ms_noisy,
        "triton": os.environ.get("AIHWKIT_USE_TRITON"),
    }))


if __name__ == "__main__":
    main()
